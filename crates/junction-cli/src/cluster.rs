//! `junction cluster ...`

use anyhow::Context;
use junction_client::proto::{ClusterStatusResponse, ScrubResponse};
use serde_json::json;

use crate::common::{
    ConnArgs, Table, full_name, id_list, leader_cell, node_json, out, out_json, station_json,
};

/// Inspect the cluster.
#[derive(clap::Args, Debug)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub command: ClusterCommand,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum ClusterCommand {
    /// Nodes, the metadata leader, and where every partition's leader and replicas are.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every stored record on every node now: checksums, and each replica's range
    /// digests against its leader's. A corrupt follower replica is wiped and catches up from
    /// its leader; a corrupt leader hands leadership over first (run it again to repair).
    /// Exits 1 when anything corrupt was found.
    Scrub {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a node: every partition replica on it moves to another node (the new replica
    /// catches up before the node leaves each partition), then it leaves the metadata group.
    /// Stop the node's process (or scale the StatefulSet down) once it is gone. Refused when
    /// fewer nodes would be left than a station's replication factor (or than 3).
    RemoveNode {
        /// The node id (`junction cluster status` lists them).
        node: u64,
        /// Wait until the node has left the cluster.
        #[arg(long)]
        wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

pub(crate) async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        ClusterCommand::Status { json } => {
            let status = client
                .cluster_status()
                .await
                .context("getting cluster status")?;
            if json {
                out_json(&json!({
                    "nodes": status.nodes.iter().map(node_json).collect::<Vec<_>>(),
                    "metadata_leader": status.metadata_leader,
                    "metadata_term": status.metadata_term,
                    "cluster_id": status.cluster_id,
                    "moves_in_progress": status.moves_in_progress,
                    "rebalancing": status.rebalancing,
                    "format_level": status.format_level,
                    "stations": status.stations.iter().map(station_json).collect::<Vec<_>>(),
                }))
            } else {
                out(&status_text(&status))
            }
        }
        ClusterCommand::Scrub { json } => {
            let report = client.scrub().await.context("scrubbing the cluster")?;
            if json {
                out_json(&json!({
                    "nodes": report.nodes.iter().map(|n| json!({
                        "node": n.node,
                        "error": n.error,
                        "replicas": n.replicas.iter().map(|r| json!({
                            "group": r.group,
                            "station": r.station,
                            "partition": r.partition,
                            "records": r.records,
                            "bytes": r.bytes,
                            "corrupt_records": r.corrupt_records,
                            "corrupt_offsets": r.corrupt_offsets,
                            "mismatched_ranges": r.mismatched_ranges,
                            "action": r.action,
                            "error": r.error,
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                }))?;
            } else {
                out(&scrub_text(&report))?;
            }
            if scrub_found_corruption(&report) {
                std::process::exit(1);
            }
            Ok(())
        }
        ClusterCommand::RemoveNode {
            node,
            wait,
            timeout_secs,
        } => {
            client
                .remove_node(node)
                .await
                .with_context(|| format!("removing node {node}"))?;
            if !wait {
                return out(&format!(
                    "node {node} is being removed: its replicas move to other nodes \
                     (`junction cluster status` shows it draining until it is gone)\n"
                ));
            }
            let gone = crate::common::wait_for_status(&client, timeout_secs, |s| {
                !s.nodes.iter().any(|n| n.id == node)
            })
            .await
            .with_context(|| format!("waiting for node {node} to leave the cluster"))?;
            out(&format!(
                "node {node} left the cluster; {} node(s) remain\n",
                gone.nodes.len()
            ))
        }
    }
}

fn scrub_found_corruption(report: &ScrubResponse) -> bool {
    report
        .nodes
        .iter()
        .flat_map(|n| &n.replicas)
        .any(|r| r.corrupt_records > 0 || r.mismatched_ranges > 0)
}

pub(crate) fn scrub_text(report: &ScrubResponse) -> String {
    let mut t = Table::new([
        "NODE",
        "STATION",
        "PARTITION",
        "GROUP",
        "RECORDS",
        "BYTES",
        "CORRUPT",
        "DIFFERING",
        "ACTION",
    ]);
    let mut problems = String::new();
    for n in &report.nodes {
        if !n.error.is_empty() {
            problems.push_str(&format!("node {}: {}\n", n.node, n.error));
        }
        for r in &n.replicas {
            t.row(vec![
                n.node.to_string(),
                r.station.clone(),
                r.partition.to_string(),
                r.group.to_string(),
                r.records.to_string(),
                r.bytes.to_string(),
                r.corrupt_records.to_string(),
                r.mismatched_ranges.to_string(),
                r.action.clone(),
            ]);
            if !r.error.is_empty() {
                problems.push_str(&format!("node {} group {}: {}\n", n.node, r.group, r.error));
            }
            if !r.corrupt_offsets.is_empty() {
                problems.push_str(&format!(
                    "node {} group {}: corrupt offsets {:?}\n",
                    n.node, r.group, r.corrupt_offsets
                ));
            }
        }
    }
    let mut text = t.render();
    if !problems.is_empty() {
        text.push('\n');
        text.push_str(&problems);
    }
    text
}

pub(crate) fn status_text(status: &ClusterStatusResponse) -> String {
    let mut text = match (status.cluster_id.is_empty(), status.format_level) {
        (true, 0) => String::new(),
        (true, level) => format!("format level: {level}\n"),
        (false, 0) => format!("cluster: {}\n", status.cluster_id),
        (false, level) => format!("cluster: {} (format level {level})\n", status.cluster_id),
    };
    text.push_str(&match status.metadata_leader {
        Some(id) => format!(
            "metadata leader: node {id} (term {})\n\n",
            status.metadata_term
        ),
        None => format!("metadata leader: none (term {})\n\n", status.metadata_term),
    });
    let mut nodes = Table::new(["NODE", "ADDRESS", "ALIVE", "REPLICAS", "LEADERS"]);
    for n in &status.nodes {
        let alive = if n.alive { "yes" } else { "no" };
        nodes.row(vec![
            n.id.to_string(),
            n.addr.clone(),
            if n.draining {
                format!("{alive} (draining)")
            } else {
                alive.to_owned()
            },
            n.partition_replicas.to_string(),
            n.partition_leaders.to_string(),
        ]);
    }
    text.push_str(&nodes.render());
    if status.moves_in_progress > 0 || status.rebalancing {
        text.push_str(&format!(
            "\nreplica moves in progress: {}{}\n",
            status.moves_in_progress,
            if status.rebalancing {
                " (rebalancing)"
            } else {
                ""
            }
        ));
    }
    if status.stations.is_empty() {
        text.push_str("\nno stations\n");
        return text;
    }
    let mut partitions = Table::new(["STATION", "PARTITION", "LEADER", "REPLICAS", "NEXT OFFSET"]);
    for s in &status.stations {
        let name = full_name(s);
        for p in &s.partition_info {
            partitions.row(vec![
                name.clone(),
                p.partition.to_string(),
                leader_cell(p.leader),
                id_list(&p.replicas),
                p.next_offset.to_string(),
            ]);
        }
        if s.partition_info.is_empty() {
            partitions.row(vec![name, "-".into(), "-".into(), "-".into(), "-".into()]);
        }
    }
    text.push('\n');
    text.push_str(&partitions.render());
    text
}

#[cfg(test)]
mod tests {
    use junction_client::proto::*;

    #[test]
    fn status_text_lists_nodes_and_partitions() {
        let status = ClusterStatusResponse {
            nodes: vec![NodeInfo {
                id: 1,
                addr: "127.0.0.1:7701".into(),
                alive: true,
                partition_replicas: 2,
                partition_leaders: 1,
                draining: false,
            }],
            metadata_leader: Some(1),
            metadata_term: 3,
            stations: vec![StationInfo {
                tenant: "default".into(),
                name: "demo".into(),
                partitions: 1,
                partition_info: vec![PartitionInfo {
                    partition: 0,
                    replicas: vec![1, 2, 3],
                    leader: None,
                    next_offset: 9,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            cluster_id: "c0ffee".into(),
            format_level: 2,
            ..Default::default()
        };
        assert_eq!(
            super::status_text(&status),
            "cluster: c0ffee (format level 2)\n\
             metadata leader: node 1 (term 3)\n\n\
             NODE  ADDRESS         ALIVE  REPLICAS  LEADERS\n\
             1     127.0.0.1:7701  yes    2         1\n\n\
             STATION       PARTITION  LEADER  REPLICAS  NEXT OFFSET\n\
             default/demo  0          -       1,2,3     9\n"
        );
    }
}
