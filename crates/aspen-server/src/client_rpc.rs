//! The client protocol: token check (on each stream's hello, before any request is read, and
//! again on each request), then dispatch to the node's KV and cluster APIs.

use std::sync::Arc;

use aspen_api::{ClientEnvelope, ClientHello, ClientRequest, ClientResponse, ClusterController, KeyValueStore};
use aspen_consensus::RaftNode;
use aspen_transport::auth::token_matches;
use aspen_transport::{EndpointId, RpcHandler, TransportError};

use crate::metrics::{Metrics, render};
use crate::raft_rpc::IrohRaftClient;

/// Serves client requests.
pub struct ClientService {
    node: RaftNode<IrohRaftClient>,
    token: String,
    metrics: Arc<Metrics>,
}

impl ClientService {
    /// Serves `node` to clients presenting `token`.
    pub fn new(node: RaftNode<IrohRaftClient>, token: String, metrics: Arc<Metrics>) -> Self {
        ClientService { node, token, metrics }
    }
}

impl RpcHandler for ClientService {
    type Hello = ClientHello;
    type Request = ClientEnvelope;
    type Response = ClientResponse;

    fn authenticate(&self, peer: EndpointId, hello: ClientHello) -> Result<(), String> {
        if token_matches(&self.token, &hello.token) {
            return Ok(());
        }
        self.metrics.unauthorized.inc();
        tracing::warn!(peer = %peer.fmt_short(), "refused a client connection: wrong or missing token");
        Err("wrong or missing client token".into())
    }

    async fn handle(&self, peer: EndpointId, envelope: ClientEnvelope) -> ClientResponse {
        if !token_matches(&self.token, &envelope.token) {
            self.metrics.unauthorized.inc();
            tracing::warn!(peer = %peer.fmt_short(), "refused a client request: wrong or missing token");
            return ClientResponse::Unauthorized("wrong or missing client token".into());
        }
        let node = &self.node;
        let metrics = &self.metrics;
        match envelope.request {
            ClientRequest::Get(request) => {
                let result = metrics.reads.time(node.get(request)).await;
                ClientResponse::Get(result)
            }
            ClientRequest::Scan(request) => ClientResponse::Scan(metrics.reads.time(node.scan(request)).await),
            ClientRequest::Write(command) => ClientResponse::Write(metrics.writes.time(node.write(command)).await),
            ClientRequest::Sql(request) => ClientResponse::Sql(metrics.reads.time(node.sql(request)).await),
            ClientRequest::Status => ClientResponse::Status(node.status().await),
            ClientRequest::Metrics => ClientResponse::Metrics(render(node, metrics)),
            ClientRequest::Init(members) => ClientResponse::Cluster(node.init(members).await),
            ClientRequest::AddLearner(member) => ClientResponse::Cluster(node.add_learner(member).await),
            ClientRequest::ChangeMembership(voters) => ClientResponse::Cluster(node.change_membership(voters).await),
            ClientRequest::Remove(id) => ClientResponse::Cluster(node.remove(id).await),
            ClientRequest::TriggerSnapshot => ClientResponse::Cluster(node.trigger_snapshot().await),
            ClientRequest::TransferLeader(id) => ClientResponse::Cluster(node.transfer_leader(id).await),
            ClientRequest::StampedGet(request) => {
                ClientResponse::StampedGet(metrics.reads.time(node.get_stamped(request)).await)
            }
            ClientRequest::Term => ClientResponse::Term(node.term().await),
            ClientRequest::StampedScan(request) => {
                ClientResponse::StampedScan(metrics.reads.time(node.scan_stamped(request)).await)
            }
        }
    }

    fn reject(&self, peer: EndpointId, error: TransportError) -> ClientResponse {
        tracing::warn!(peer = %peer.fmt_short(), %error, "refused a malformed client request");
        ClientResponse::Rejected(error.to_string())
    }
}
