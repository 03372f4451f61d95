//! The `cluster` commands: status of every node, init, membership changes, maintenance.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use aspen_api::{ClusterNode, ClusterStatus, Liveness, NodeId, PeerHealth};
use aspen_client::{AspenClient, ClientError};
use aspen_transport::PeerAddr;
use serde_json::json;
use tokio::time::Instant;

use crate::Outcome;
use crate::cli::ClusterCommand;
use crate::output::{NodeRow, peer_health_table, print, print_json, status_table};

/// Pause between status polls of a node that is not answering yet.
const STATUS_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long `cluster status` still waits for the other nodes once one has answered: a live
/// node answers in milliseconds, a crashed one never, and the dial to it would only end at
/// the connect timeout.
const STATUS_ANSWER_GRACE: Duration = Duration::from_secs(1);
/// How long `cluster status` still waits, once the leader has answered, for nodes that the
/// leader's failure detector calls down or suspect. A crashed node never answers, and a
/// dial to it would only end at the connect timeout (seconds); a live one answers in
/// milliseconds.
const STATUS_DOWN_GRACE: Duration = Duration::from_millis(250);

/// Runs one `cluster` command.
pub async fn run(
    client: Arc<AspenClient>,
    command: ClusterCommand,
    json: bool,
    deadline: Duration,
) -> anyhow::Result<Outcome> {
    let done = |text: String| -> anyhow::Result<Outcome> {
        if json {
            print_json(&json!({ "ok": true, "message": text }))?;
        } else {
            print(&text)?;
        }
        Ok(Outcome::Done)
    };
    match command {
        ClusterCommand::Status => status(client, json, deadline).await,
        ClusterCommand::Init => init(&client, json, deadline).await,
        ClusterCommand::AddLearner { id, addr } => {
            let peer: PeerAddr = addr.parse().with_context(|| format!("invalid node address {addr:?}"))?;
            client.add_learner(ClusterNode { id, addr: peer.to_string() }).await?;
            done(format!("added node {id} as a learner; make it a voter with `aspen-cli cluster promote {id}`"))
        }
        ClusterCommand::Promote { id } => {
            let status = client.status().await?;
            if status.voters.contains(&id) {
                return done(format!("node {id} is already a voter"));
            }
            if !status.learners.contains(&id) {
                bail!("node {id} is not a learner; add it first with `aspen-cli cluster add-learner {id} <ADDR>`");
            }
            let voters: BTreeSet<NodeId> = status.voters.iter().copied().chain([id]).collect();
            client.change_membership(voters.clone()).await?;
            done(format!("node {id} is now a voter; voters: {}", id_list(&voters)))
        }
        ClusterCommand::Remove { id } => {
            client.remove(id).await?;
            done(format!("removed node {id}"))
        }
        ClusterCommand::Snapshot => {
            client.trigger_snapshot().await?;
            done("snapshot triggered".into())
        }
        ClusterCommand::TransferLeader { id } => {
            client.transfer_leader(id).await?;
            done(format!("leadership handed to node {id}"))
        }
        ClusterCommand::Metrics { node } => {
            let peer = match node {
                Some(addr) => addr.parse().with_context(|| format!("invalid node address {addr:?}"))?,
                None => client.peers().first().cloned().context("no node address configured")?,
            };
            let text = client.node_metrics(&peer).await?;
            if json {
                print_json(&json!({ "node": peer.to_string(), "metrics": text }))?;
            } else {
                print(text.trim_end())?;
            }
            Ok(Outcome::Done)
        }
    }
}

/// Node ids as `1, 2, 3` (or `none`).
pub fn id_list(ids: &BTreeSet<NodeId>) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter().map(NodeId::to_string).collect::<Vec<_>>().join(", ")
}

/// Asks one node for its status, retrying while it is unreachable (still starting) until
/// `deadline`. Other errors are final.
pub async fn node_status_until(
    client: &AspenClient,
    peer: &PeerAddr,
    deadline: Instant,
) -> anyhow::Result<ClusterStatus> {
    loop {
        match tokio::time::timeout_at(deadline, client.node_status(peer)).await {
            Err(_) => bail!("no answer before the deadline"),
            Ok(Err(ClientError::Unreachable(_))) if Instant::now() + STATUS_RETRY_PAUSE < deadline => {
                tokio::time::sleep(STATUS_RETRY_PAUSE).await
            }
            Ok(result) => return Ok(result?),
        }
    }
}

async fn status(client: Arc<AspenClient>, json: bool, deadline: Duration) -> anyhow::Result<Outcome> {
    // Ask every node at once: one unreachable node must not hold up the others' rows.
    let mut tasks = tokio::task::JoinSet::new();
    for (index, peer) in client.peers().iter().cloned().enumerate() {
        let client = Arc::clone(&client);
        tasks.spawn(async move {
            let answer = tokio::time::timeout(deadline, client.node_status(&peer)).await;
            let answer = answer.unwrap_or_else(|_| Err(ClientError::Protocol("no answer before the deadline".into())));
            (index, peer, answer.map_err(|error| error.to_string()))
        });
    }
    let mut answers = Vec::with_capacity(client.peers().len());
    let mut give_up_at: Option<Instant> = None;
    loop {
        let joined = match give_up_at {
            Some(at) => match tokio::time::timeout_at(at, tasks.join_next()).await {
                Ok(joined) => joined,
                Err(_) => break,
            },
            None => tasks.join_next().await,
        };
        let Some(joined) = joined else { break };
        answers.push(joined.context("status task failed")?);
        let grace =
            if leader_calls_the_rest_down(client.peers(), &answers) { STATUS_DOWN_GRACE } else { STATUS_ANSWER_GRACE };
        if answers.iter().any(|(_, _, answer)| answer.is_ok()) {
            let at = Instant::now() + grace;
            give_up_at = Some(give_up_at.map_or(at, |earlier| earlier.min(at)));
        }
    }
    // Whoever has not answered by now is one the leader calls down, or took far longer than
    // the others: say so, without waiting for a connect timeout.
    let leader_view = answers.iter().find_map(|(_, _, answer)| answer.as_ref().ok().filter(|status| leads(status)));
    let missing: Vec<(usize, PeerAddr, Result<ClusterStatus, String>)> = client
        .peers()
        .iter()
        .enumerate()
        .filter(|(index, _)| !answers.iter().any(|(answered, _, _)| answered == index))
        .map(|(index, peer)| {
            let seen = leader_view.and_then(|view| peer_seen_by(view, peer));
            let error = match seen {
                None if leader_view.is_none() => {
                    format!("no answer within {} ms of another node's", STATUS_ANSWER_GRACE.as_millis())
                }
                Some(health) => format!(
                    "no answer within {} ms; the leader calls node {} {}{}",
                    STATUS_DOWN_GRACE.as_millis(),
                    health.node_id,
                    format!("{:?}", health.liveness).to_lowercase(),
                    health.last_error.as_deref().map(|error| format!(" ({error})")).unwrap_or_default()
                ),
                None => format!("no answer within {} ms of the leader's", STATUS_ANSWER_GRACE.as_millis()),
            };
            (index, peer.clone(), Err(error))
        })
        .collect();
    tasks.abort_all();
    answers.extend(missing);
    answers.sort_by_key(|(index, _, _)| *index);
    // The leader's view of membership is the authoritative one; any answer beats none.
    let view = answers
        .iter()
        .filter_map(|(_, _, answer)| answer.as_ref().ok())
        .max_by_key(|status| status.leader == Some(status.node_id))
        .cloned();
    let rows: Vec<NodeRow> = answers
        .into_iter()
        .map(|(_, peer, answer)| NodeRow {
            member_id: view.as_ref().and_then(|view| member_id(view, &peer)),
            addr: peer.to_string(),
            answer,
        })
        .collect();

    if json {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|row| match &row.answer {
                Ok(status) => json!({ "addr": row.addr, "status": status }),
                Err(error) => json!({ "addr": row.addr, "node_id": row.member_id, "error": error }),
            })
            .collect();
        print_json(&json!({ "nodes": rows }))?;
    } else {
        let mut text = status_table(&rows);
        for row in &rows {
            if let Err(error) = &row.answer {
                text.push_str(&format!("\n{}: {error}", row.addr));
            }
        }
        if let Some(view) = &view {
            text.push_str(&format!("\n\nvoters: {}; learners: {}", id_list(&view.voters), id_list(&view.learners)));
            if !view.peers.is_empty() {
                let peers = peer_health_table(&view.peers);
                text.push_str(&format!("\n\npeers as seen by node {}:\n{peers}", view.node_id));
            }
        }
        print(&text)?;
    }
    if view.is_none() {
        bail!("no node answered");
    }
    Ok(Outcome::Done)
}

/// Whether `status` comes from the leader.
fn leads(status: &ClusterStatus) -> bool {
    status.leader == Some(status.node_id)
}

/// How the leader whose status is `view` sees the node at `peer`, if it is a member.
fn peer_seen_by<'a>(view: &'a ClusterStatus, peer: &PeerAddr) -> Option<&'a PeerHealth> {
    let id = member_id(view, peer)?;
    view.peers.iter().find(|health| health.node_id == id)
}

/// Whether the leader has answered and every configured node yet to answer is one it calls
/// down or suspect.
fn leader_calls_the_rest_down(
    peers: &[PeerAddr],
    answers: &[(usize, PeerAddr, Result<ClusterStatus, String>)],
) -> bool {
    let Some(view) = answers.iter().find_map(|(_, _, answer)| answer.as_ref().ok().filter(|status| leads(status)))
    else {
        return false;
    };
    peers
        .iter()
        .enumerate()
        .filter(|(index, _)| !answers.iter().any(|(answered, _, _)| answered == index))
        .all(|(_, peer)| peer_seen_by(view, peer).is_some_and(|health| health.liveness != Liveness::Healthy))
}

/// The id `view`'s membership gives the node at `peer`, matched by endpoint id (the socket
/// address may be written differently).
fn member_id(view: &ClusterStatus, peer: &PeerAddr) -> Option<NodeId> {
    view.nodes
        .iter()
        .find(|node| node.addr.parse::<PeerAddr>().is_ok_and(|addr| addr.id == peer.id))
        .map(|node| node.id)
}

/// The members of a new cluster: every configured node under the id it reports.
async fn learn_members(client: &AspenClient, deadline: Instant) -> anyhow::Result<Vec<ClusterNode>> {
    let mut members: Vec<ClusterNode> = Vec::with_capacity(client.peers().len());
    for peer in client.peers() {
        let status = node_status_until(client, peer, deadline).await.with_context(|| format!("asking {peer}"))?;
        if !status.voters.is_empty() {
            bail!(
                "the cluster is already initialized (node {} has voters {})",
                status.node_id,
                id_list(&status.voters)
            );
        }
        if let Some(other) = members.iter().find(|member| member.id == status.node_id) {
            bail!("{peer} and {} both have node id {}", other.addr, status.node_id);
        }
        members.push(ClusterNode { id: status.node_id, addr: peer.to_string() });
    }
    Ok(members)
}

async fn init(client: &AspenClient, json: bool, deadline: Duration) -> anyhow::Result<Outcome> {
    let members = learn_members(client, Instant::now() + deadline).await?;
    client.init(members.clone()).await.context("initializing the cluster")?;
    if json {
        print_json(&json!({ "ok": true, "voters": members }))?;
    } else {
        let lines: Vec<String> =
            members.iter().map(|member| format!("  node {}  {}", member.id, member.addr)).collect();
        print(&format!("initialized a cluster of {} voters:\n{}", members.len(), lines.join("\n")))?;
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_lists_read_naturally() {
        assert_eq!(id_list(&BTreeSet::new()), "none");
        assert_eq!(id_list(&[3, 1, 2].into()), "1, 2, 3");
    }
}
