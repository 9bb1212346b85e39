//! Joining a running cluster.
//!
//! The member list a node starts with only matters the first time a cluster starts (the
//! lowest id initialises it with that list). A node whose id the running cluster does not
//! have — a StatefulSet scaled from 3 to 5, say — asks the configured members, through the
//! `Peer.JoinCluster` call, to be added to the metadata group: the metadata leader adds it as
//! a learner, waits until it caught up, and promotes it to voter. New stations may then place
//! replicas on it. Removing nodes is not automatic.

use std::time::Duration;

use junction_proto::peer::JoinClusterRequest;

use crate::Broker;

/// Grace before the first attempt: a node of a cluster that is starting learns its
/// membership from the initialising node within this time.
const FIRST_ATTEMPT: Duration = Duration::from_secs(5);
/// Between attempts.
const RETRY: Duration = Duration::from_secs(2);
/// One join call (adding a learner waits until it caught up).
const CALL_LIMIT: Duration = Duration::from_secs(30);

impl Broker {
    /// Whether the metadata group's membership has this node as a voter.
    pub fn is_voter(&self) -> bool {
        self.meta_voters().contains(&self.node_id())
    }

    /// Asks to be added to the cluster until this node is a voter.
    pub(crate) async fn join_loop(&self) {
        let shutdown = self.shutdown_token();
        let mut wait = FIRST_ATTEMPT;
        let mut hint: Option<String> = None;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            wait = RETRY;
            if self.is_voter() {
                return;
            }
            let Some(me) = self.config().members.get(&self.node_id()).cloned() else {
                return;
            };
            let mut targets: Vec<String> = hint.take().into_iter().collect();
            targets.extend(
                self.config()
                    .members
                    .iter()
                    .filter(|(id, _)| **id != self.node_id())
                    .map(|(_, a)| a.clone()),
            );
            for addr in targets {
                let Ok(mut client) = self.peers().client(&addr) else {
                    continue;
                };
                let req = JoinClusterRequest {
                    node_id: self.node_id(),
                    addr: me.clone(),
                };
                let Ok(Ok(resp)) = tokio::time::timeout(CALL_LIMIT, client.join_cluster(req)).await
                else {
                    continue;
                };
                let resp = resp.into_inner();
                if resp.joined {
                    tracing::info!(via = %addr, "joined the cluster");
                    break;
                }
                if !resp.leader_addr.is_empty() {
                    hint = Some(resp.leader_addr);
                    break;
                }
                tracing::debug!(via = %addr, error = %resp.error, "join not accepted yet");
            }
        }
    }
}
