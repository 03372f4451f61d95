//! The client protocol: token check (on each stream's hello, before any request is read, and
//! again on each request) and metrics around the node's own dispatch
//! (`RaftNode::handle_client`, which the simulator calls too).

use std::sync::Arc;

use aspen_api::{ClientEnvelope, ClientHello, ClientRequest, ClientResponse};
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
        let request = envelope.request;
        let stats = match &request {
            ClientRequest::Metrics => return ClientResponse::Metrics(render(node, metrics)),
            ClientRequest::Get(_)
            | ClientRequest::Scan(_)
            | ClientRequest::Sql(_)
            | ClientRequest::StampedGet(_)
            | ClientRequest::StampedScan(_) => Some(&metrics.reads),
            ClientRequest::Write(_) => Some(&metrics.writes),
            _ => None,
        };
        let started = std::time::Instant::now();
        let response = node.handle_client(request).await;
        if let Some(stats) = stats {
            stats.record(started, response.is_error());
        }
        response
    }

    fn reject(&self, peer: EndpointId, error: TransportError) -> ClientResponse {
        tracing::warn!(peer = %peer.fmt_short(), %error, "refused a malformed client request");
        ClientResponse::Rejected(error.to_string())
    }
}
