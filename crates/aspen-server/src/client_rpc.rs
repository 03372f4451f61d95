//! The client protocol: token checks and metrics around the node's own dispatch
//! (`RaftNode::handle_client`, which the simulator calls too).
//!
//! A node has two tokens. The data token grants [`Right::Data`]: reads and writes of keys,
//! and the harmless reads (status, term, metrics) that operators and the client's own
//! linearizable reads need. The admin token grants everything, [`Right::Admin`] included:
//! init, membership changes, removal, snapshots, leadership transfer. Each stream's hello
//! must carry one of the two (it authenticates the connection, before any request is read);
//! each request's envelope carries a token again, and that token decides what the request
//! may do, so one connection never lends its rights to a request.

use std::sync::Arc;

use aspen_api::{ClientEnvelope, ClientHello, ClientRequest, ClientResponse, Right, Secret};
use aspen_consensus::RaftNode;
use aspen_transport::auth::token_matches;
use aspen_transport::{EndpointId, RpcHandler, TransportError};

use crate::metrics::{Metrics, render};
use crate::raft_rpc::IrohRaftClient;

/// The two tokens a node accepts from clients.
#[derive(Clone, Debug)]
pub struct ClientTokens {
    /// Grants [`Right::Data`].
    pub data: Secret,
    /// Grants every right.
    pub admin: Secret,
}

impl ClientTokens {
    /// The rights `presented` grants: the admin token's, the data token's, or none.
    pub fn right_of(&self, presented: &Secret) -> Option<Right> {
        // Both compared every time, each in constant time: timing does not tell which matched.
        let admin = token_matches(self.admin.expose(), presented.expose());
        let data = token_matches(self.data.expose(), presented.expose());
        match (admin, data) {
            (true, _) => Some(Right::Admin),
            (false, true) => Some(Right::Data),
            (false, false) => None,
        }
    }

    /// Why `request` is refused with `presented`, or `None` when it may run.
    pub fn refusal(&self, presented: &Secret, request: &ClientRequest) -> Option<String> {
        match (self.right_of(presented), request.right()) {
            (None, _) => Some(WRONG_TOKEN.into()),
            (Some(Right::Admin), _) | (Some(Right::Data), Right::Data) => None,
            (Some(Right::Data), Right::Admin) => Some(format!(
                "{} needs the admin token (admin_token on the nodes; aspen-cli --admin-token or \
                 ASPEN_ADMIN_TOKEN): this token grants data access only",
                request.operation()
            )),
        }
    }
}

/// The refusal of a token that is neither of the node's.
const WRONG_TOKEN: &str = "wrong or missing client token";

/// Serves client requests.
pub struct ClientService {
    node: RaftNode<IrohRaftClient>,
    tokens: ClientTokens,
    metrics: Arc<Metrics>,
}

impl ClientService {
    /// Serves `node` to clients presenting one of `tokens`, each request within its rights.
    pub fn new(node: RaftNode<IrohRaftClient>, tokens: ClientTokens, metrics: Arc<Metrics>) -> Self {
        ClientService { node, tokens, metrics }
    }
}

impl RpcHandler for ClientService {
    type Hello = ClientHello;
    type Request = ClientEnvelope;
    type Response = ClientResponse;

    fn authenticate(&self, peer: EndpointId, hello: ClientHello) -> Result<(), String> {
        if self.tokens.right_of(&hello.token).is_some() {
            return Ok(());
        }
        self.metrics.unauthorized.inc();
        tracing::warn!(peer = %peer.fmt_short(), "refused a client connection: wrong or missing token");
        Err(WRONG_TOKEN.into())
    }

    async fn handle(&self, peer: EndpointId, envelope: ClientEnvelope) -> ClientResponse {
        if let Some(reason) = self.tokens.refusal(&envelope.token, &envelope.request) {
            self.metrics.unauthorized.inc();
            tracing::warn!(
                peer = %peer.fmt_short(),
                operation = envelope.request.operation(),
                "refused a client request: {reason}"
            );
            return ClientResponse::Unauthorized(reason);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_grants_everything_and_the_data_token_only_data() {
        let tokens = ClientTokens { data: Secret::new("data"), admin: Secret::new("admin") };
        let (data, admin, wrong) = (Secret::new("data"), Secret::new("admin"), Secret::new("datA"));
        assert_eq!(tokens.right_of(&admin), Some(Right::Admin));
        assert_eq!(tokens.right_of(&data), Some(Right::Data));
        assert_eq!(tokens.right_of(&wrong), None);
        assert_eq!(tokens.right_of(&Secret::default()), None);

        for request in [ClientRequest::Status, ClientRequest::Term, ClientRequest::Metrics] {
            assert_eq!(tokens.refusal(&data, &request), None, "{}", request.operation());
            assert_eq!(tokens.refusal(&admin, &request), None, "{}", request.operation());
        }
        for request in [ClientRequest::Remove(2), ClientRequest::TransferLeader(2), ClientRequest::TriggerSnapshot] {
            let refusal = tokens.refusal(&data, &request).expect("the data token cannot administer");
            assert!(refusal.contains("admin token") && refusal.contains(request.operation()), "{refusal}");
            assert_eq!(tokens.refusal(&admin, &request), None, "{}", request.operation());
            assert_eq!(tokens.refusal(&wrong, &request).as_deref(), Some(WRONG_TOKEN));
        }
    }
}
