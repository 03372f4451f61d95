//! Proofs that a peer holds the cluster secret, and client token checks.
//!
//! A caller's proof is `blake3::keyed_hash(derive_key(secret), endpoint_id)`: it binds the
//! secret to the sender's endpoint id, which the QUIC handshake authenticates, so a proof
//! seen on the wire is useless to any other identity and the secret itself is never sent.
//!
//! The callee proves the secret too, so a caller can refuse a peer that answers without
//! it: each request carries a fresh [`Challenges`] value, and the answer carries
//! [`responder_proof`] over the callee's and the caller's endpoint ids and that challenge,
//! under a key of its own (a caller's proof never doubles as a callee's). It cannot be
//! replayed (the challenge is new each time) nor relayed (both identities are QUIC's).

use std::sync::atomic::{AtomicU64, Ordering};

use iroh::{EndpointId, SecretKey};

const PROOF_CONTEXT: &str = "aspen 2026-11 cluster secret proof v1";
const RESPONDER_CONTEXT: &str = "aspen 2026-12 cluster secret responder proof v1";
const TOKEN_CONTEXT: &str = "aspen 2026-11 client token compare v1";

/// The proof `endpoint` presents to show it holds `secret`.
pub fn cluster_proof(secret: &str, endpoint: &EndpointId) -> [u8; 32] {
    let key = blake3::derive_key(PROOF_CONTEXT, secret.as_bytes());
    *blake3::keyed_hash(&key, endpoint.as_bytes()).as_bytes()
}

/// Whether `proof` shows that `endpoint` holds `secret` (constant-time comparison).
pub fn verify_cluster_proof(secret: &str, endpoint: &EndpointId, proof: &[u8; 32]) -> bool {
    blake3::Hash::from(cluster_proof(secret, endpoint)) == blake3::Hash::from(*proof)
}

/// The proof the callee `responder` returns to `caller` for `challenge`, to show it holds
/// `secret`.
pub fn responder_proof(secret: &str, responder: &EndpointId, caller: &EndpointId, challenge: &[u8; 32]) -> [u8; 32] {
    let key = blake3::derive_key(RESPONDER_CONTEXT, secret.as_bytes());
    let mut hasher = blake3::Hasher::new_keyed(&key);
    hasher.update(responder.as_bytes());
    hasher.update(caller.as_bytes());
    hasher.update(challenge);
    *hasher.finalize().as_bytes()
}

/// Whether `proof` shows that `responder` holds `secret`, answering `caller`'s `challenge`
/// (constant-time comparison).
pub fn verify_responder_proof(
    secret: &str,
    responder: &EndpointId,
    caller: &EndpointId,
    challenge: &[u8; 32],
    proof: &[u8; 32],
) -> bool {
    blake3::Hash::from(responder_proof(secret, responder, caller, challenge)) == blake3::Hash::from(*proof)
}

/// A source of challenges: each new, none predictable. The keyed hash of a counter under a
/// random key, so drawing one costs a hash, not a system call.
pub struct Challenges {
    key: [u8; 32],
    next: AtomicU64,
}

impl Default for Challenges {
    fn default() -> Self {
        // iroh's key generator is this crate's source of OS randomness.
        Challenges { key: SecretKey::generate().to_bytes(), next: AtomicU64::new(0) }
    }
}

impl Challenges {
    /// The next challenge.
    pub fn next(&self) -> [u8; 32] {
        let count = self.next.fetch_add(1, Ordering::Relaxed);
        *blake3::keyed_hash(&self.key, &count.to_le_bytes()).as_bytes()
    }
}

/// Compares a presented client token with the configured one in constant time.
pub fn token_matches(expected: &str, presented: &str) -> bool {
    let hash = |token: &str| blake3::derive_key(TOKEN_CONTEXT, token.as_bytes());
    blake3::Hash::from(hash(expected)) == blake3::Hash::from(hash(presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_secret_and_identity() {
        let alice = iroh::SecretKey::from_bytes(&[1; 32]).public();
        let bob = iroh::SecretKey::from_bytes(&[2; 32]).public();
        let proof = cluster_proof("s3cret", &alice);
        assert!(verify_cluster_proof("s3cret", &alice, &proof));
        assert!(!verify_cluster_proof("wrong", &alice, &proof));
        assert!(!verify_cluster_proof("s3cret", &bob, &proof), "a proof is not transferable");
        assert!(token_matches("t", "t"));
        assert!(!token_matches("t", "u"));
    }

    #[test]
    fn responder_proofs_bind_secret_both_identities_and_the_challenge() {
        let alice = iroh::SecretKey::from_bytes(&[1; 32]).public();
        let bob = iroh::SecretKey::from_bytes(&[2; 32]).public();
        let challenges = Challenges::default();
        let (challenge, other_challenge) = (challenges.next(), challenges.next());
        assert_ne!(challenge, other_challenge, "challenges are never repeated");
        let proof = responder_proof("s3cret", &bob, &alice, &challenge);
        assert!(verify_responder_proof("s3cret", &bob, &alice, &challenge, &proof));
        assert!(!verify_responder_proof("wrong", &bob, &alice, &challenge, &proof));
        assert!(!verify_responder_proof("s3cret", &alice, &bob, &challenge, &proof), "roles are bound");
        assert!(!verify_responder_proof("s3cret", &bob, &alice, &other_challenge, &proof), "no replay");
        assert_ne!(proof, cluster_proof("s3cret", &bob), "a caller's proof is not a responder's");
    }
}
