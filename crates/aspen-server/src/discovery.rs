//! Peer discovery by gossip of signed announcements.
//!
//! Every node periodically broadcasts, on a gossip topic derived from the cluster secret, an
//! announcement of its node id and current address, signed with its endpoint key and
//! carrying its cluster-secret proof. Receivers accept an announcement only if the signature
//! verifies against the endpoint id in the address and the proof shows that endpoint holds
//! the secret; newer announcements replace older ones. A node started with one known peer
//! learns the others, and a node that comes back on a new address is found again: the
//! Raft client dials the address book before the address recorded in the membership.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aspen_api::limits::MAX_PEERS;
use aspen_api::{NodeId, Secret};
use aspen_transport::auth::{cluster_proof, verify_cluster_proof};
use aspen_transport::{EndpointId, MemoryLookup, PeerAddr, SecretKey};
use futures::StreamExt;
use iroh::Signature;
use iroh_gossip::api::Event;
use iroh_gossip::{Gossip, TopicId};
use serde::{Deserialize, Serialize};

/// How often a node re-announces itself.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(5);
/// Largest gossip message accepted.
pub const MAX_ANNOUNCEMENT_SIZE: usize = 4096;
/// Most entries the address book holds.
const MAX_BOOK_ENTRIES: usize = MAX_PEERS * 4;
/// Announcements from further in the future than this are refused (clock skew allowance).
const MAX_FUTURE_SKEW_MS: i64 = 60_000;

/// What a node says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Announcement {
    /// The node's Raft id.
    pub node_id: NodeId,
    /// Its address, `<endpoint-id>@<ip:port>`.
    pub addr: String,
    /// When it was issued (Unix ms): newer wins.
    pub issued_at_ms: i64,
    /// The node's cluster-secret proof.
    pub proof: [u8; 32],
}

/// An announcement with its signature over the encoded body.
#[derive(Debug, Serialize, Deserialize)]
pub struct SignedAnnouncement {
    /// postcard of [`Announcement`].
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Signature by the endpoint key named in the announced address.
    pub signature: Signature,
}

/// Why an announcement was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    /// Not decodable or too large.
    #[error("malformed announcement: {0}")]
    Malformed(String),
    /// The signature does not verify against the announced endpoint id.
    #[error("bad signature for endpoint {0}")]
    BadSignature(String),
    /// The signer does not hold the cluster secret.
    #[error("endpoint {0} does not prove the cluster secret")]
    NotAMember(String),
    /// Issued implausibly far in the future.
    #[error("announcement from the future ({0} ms ahead)")]
    FromTheFuture(i64),
}

/// Signs an announcement of `node_id` at `addr`.
pub fn sign_announcement(key: &SecretKey, secret: &Secret, node_id: NodeId, addr: &PeerAddr, now_ms: i64) -> Vec<u8> {
    let announcement = Announcement {
        node_id,
        addr: addr.to_string(),
        issued_at_ms: now_ms,
        proof: cluster_proof(secret.expose(), &key.public()),
    };
    let body = postcard::to_stdvec(&announcement).unwrap_or_default();
    let signature = key.sign(&body);
    postcard::to_stdvec(&SignedAnnouncement { body, signature }).unwrap_or_default()
}

/// Checks a received announcement; returns it with its parsed address.
pub fn verify_announcement(
    bytes: &[u8],
    secret: &Secret,
    now_ms: i64,
) -> Result<(Announcement, PeerAddr), AnnouncementError> {
    if bytes.len() > MAX_ANNOUNCEMENT_SIZE {
        return Err(AnnouncementError::Malformed(format!("{} bytes", bytes.len())));
    }
    let signed: SignedAnnouncement =
        postcard::from_bytes(bytes).map_err(|error| AnnouncementError::Malformed(error.to_string()))?;
    let announcement: Announcement =
        postcard::from_bytes(&signed.body).map_err(|error| AnnouncementError::Malformed(error.to_string()))?;
    let addr: PeerAddr = announcement
        .addr
        .parse()
        .map_err(|error: aspen_transport::TransportError| AnnouncementError::Malformed(error.to_string()))?;
    addr.id.verify(&signed.body, &signed.signature).map_err(|_| AnnouncementError::BadSignature(addr.short()))?;
    if !verify_cluster_proof(secret.expose(), &addr.id, &announcement.proof) {
        return Err(AnnouncementError::NotAMember(addr.short()));
    }
    let ahead = announcement.issued_at_ms - now_ms;
    if ahead > MAX_FUTURE_SKEW_MS {
        return Err(AnnouncementError::FromTheFuture(ahead));
    }
    Ok((announcement, addr))
}

/// The freshest address heard for each node.
#[derive(Debug, Default)]
pub struct AddressBook {
    entries: RwLock<BTreeMap<NodeId, (PeerAddr, i64)>>,
}

impl AddressBook {
    /// The freshest known address of `node`.
    pub fn get(&self, node: NodeId) -> Option<PeerAddr> {
        let entries = self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.get(&node).map(|(addr, _)| addr.clone())
    }

    /// Records an address if it is newer than what the book has; returns whether it changed.
    pub fn offer(&self, node: NodeId, addr: PeerAddr, issued_at_ms: i64) -> bool {
        let mut entries = self.entries.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        match entries.get(&node) {
            Some((_, issued)) if *issued >= issued_at_ms => false,
            None if entries.len() >= MAX_BOOK_ENTRIES => false,
            _ => {
                entries.insert(node, (addr, issued_at_ms));
                true
            }
        }
    }

    /// Every known node and address.
    pub fn all(&self) -> Vec<(NodeId, PeerAddr)> {
        let entries = self.entries.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.iter().map(|(node, (addr, _))| (*node, addr.clone())).collect()
    }
}

/// The gossip topic of a cluster: derived from its secret, so only members know it.
pub fn cluster_topic(secret: &Secret) -> TopicId {
    TopicId::from_bytes(blake3::derive_key("aspen 2026-11 gossip discovery topic v1", secret.expose().as_bytes()))
}

/// The mDNS service name of a cluster, derived from its secret so clusters sharing a LAN
/// do not see each other (and the secret is not revealed).
pub fn mdns_service_name(secret: &Secret) -> String {
    let digest = blake3::derive_key("aspen 2026-11 mdns service name v1", secret.expose().as_bytes());
    let suffix: String = digest[..6].iter().map(|byte| format!("{byte:02x}")).collect();
    format!("aspen-{suffix}")
}

/// Waits for the next locally discovered endpoint, or forever when there is no source.
async fn next_local_peer(source: &mut Option<tokio::sync::mpsc::Receiver<EndpointId>>) -> EndpointId {
    match source {
        Some(receiver) => match receiver.recv().await {
            Some(peer) => peer,
            None => {
                *source = None;
                std::future::pending().await
            }
        },
        None => std::future::pending().await,
    }
}

/// Everything the discovery task needs.
pub struct Discovery {
    /// The gossip instance (also registered on the router).
    pub gossip: Gossip,
    /// This node's key, for signing.
    pub key: SecretKey,
    /// The cluster secret.
    pub secret: Secret,
    /// This node's id and address.
    pub me: (NodeId, PeerAddr),
    /// Where learned addresses go.
    pub book: Arc<AddressBook>,
    /// The endpoint's static lookup, so gossip and RPC can dial learned peers by id.
    pub lookup: MemoryLookup,
    /// Endpoints found on the LAN by mDNS, to join the gossip topic through.
    pub local_peers: Option<tokio::sync::mpsc::Receiver<EndpointId>>,
}

/// Shows who announces what, never the secret (a [`Secret`] prints `<redacted>`).
impl std::fmt::Debug for Discovery {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Discovery")
            .field("endpoint", &self.key.public().fmt_short().to_string())
            .field("secret", &self.secret)
            .field("me", &(self.me.0, self.me.1.to_string()))
            .field("known_peers", &self.book.all().len())
            .field("mdns", &self.local_peers.is_some())
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// Runs until the gossip instance shuts down: joins the topic through `bootstrap`,
    /// announces this node periodically and whenever a neighbor appears, and records every
    /// valid announcement heard.
    pub async fn run(mut self, bootstrap: Vec<EndpointId>) {
        let topic = cluster_topic(&self.secret);
        loop {
            let subscription = match self.gossip.subscribe(topic, bootstrap.clone()).await {
                Ok(subscription) => subscription,
                Err(error) => {
                    tracing::warn!(%error, "gossip subscribe failed; retrying");
                    tokio::time::sleep(ANNOUNCE_INTERVAL).await;
                    continue;
                }
            };
            let (sender, mut receiver) = subscription.split();
            let mut ticker = tokio::time::interval(ANNOUNCE_INTERVAL);
            loop {
                tokio::select! {
                    _ = ticker.tick() => self.announce(&sender).await,
                    peer = next_local_peer(&mut self.local_peers) => {
                        if let Err(error) = sender.join_peers(vec![peer]).await {
                            tracing::debug!(%error, "joining an mDNS-discovered peer failed");
                        }
                    }
                    event = receiver.next() => match event {
                        Some(Ok(Event::Received(message))) => self.hear(&message.content),
                        Some(Ok(Event::NeighborUp(_))) => self.announce(&sender).await,
                        Some(Ok(Event::NeighborDown(_))) => {}
                        // Lagged closes the subscription; so does any error: join again.
                        Some(Ok(Event::Lagged)) | Some(Err(_)) | None => break,
                    },
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn announce(&self, sender: &iroh_gossip::api::GossipSender) {
        let (node_id, addr) = &self.me;
        let message = sign_announcement(&self.key, &self.secret, *node_id, addr, crate::raft_rpc::unix_ms());
        if let Err(error) = sender.broadcast(bytes::Bytes::from(message)).await {
            tracing::debug!(%error, "gossip broadcast failed");
        }
    }

    fn hear(&self, bytes: &[u8]) {
        match verify_announcement(bytes, &self.secret, crate::raft_rpc::unix_ms()) {
            Ok((announcement, addr)) if announcement.node_id != self.me.0 => {
                if self.book.offer(announcement.node_id, addr.clone(), announcement.issued_at_ms) {
                    tracing::info!(node = announcement.node_id, %addr, "discovered peer address");
                    self.lookup.add_endpoint_info(addr.endpoint_addr());
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "ignored a gossip announcement"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr_of(key: &SecretKey, port: u16) -> PeerAddr {
        PeerAddr { id: key.public(), addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))] }
    }

    #[test]
    fn only_signed_announcements_from_secret_holders_are_accepted() {
        let secret = Secret::new("cluster-secret");
        let key = SecretKey::from_bytes(&[3; 32]);
        let addr = addr_of(&key, 7000);
        let good = sign_announcement(&key, &secret, 2, &addr, 1_000);
        let (announcement, parsed) = verify_announcement(&good, &secret, 1_000).expect("valid");
        assert_eq!((announcement.node_id, parsed), (2, addr.clone()));

        assert!(matches!(
            verify_announcement(&good, &Secret::new("other-secret"), 1_000),
            Err(AnnouncementError::NotAMember(_))
        ));
        // Someone else's key signing an announcement of this node's address.
        let forger = SecretKey::from_bytes(&[4; 32]);
        let forged = sign_announcement(&forger, &secret, 2, &addr, 1_000);
        assert!(matches!(verify_announcement(&forged, &secret, 1_000), Err(AnnouncementError::BadSignature(_))));
        let mut tampered = good.clone();
        let last = tampered.len() - 70;
        tampered[last] ^= 1;
        assert!(verify_announcement(&tampered, &secret, 1_000).is_err());
        assert!(matches!(verify_announcement(b"garbage", &secret, 0), Err(AnnouncementError::Malformed(_))));
        let future = sign_announcement(&key, &secret, 2, &addr, 10_000_000);
        assert!(matches!(verify_announcement(&future, &secret, 0), Err(AnnouncementError::FromTheFuture(_))));
    }

    #[test]
    fn address_book_keeps_the_newest_address() {
        let key = SecretKey::from_bytes(&[5; 32]);
        let book = AddressBook::default();
        assert!(book.offer(1, addr_of(&key, 1), 10));
        assert!(!book.offer(1, addr_of(&key, 2), 5), "older announcement ignored");
        assert!(book.offer(1, addr_of(&key, 3), 20));
        assert_eq!(book.get(1), Some(addr_of(&key, 3)));
    }
}
