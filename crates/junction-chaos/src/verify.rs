//! After the faults: waiting for the replicas to converge, and reading every partition from
//! every replica (`local_replica = true`, so each node answers from its own copy).

use std::collections::BTreeMap;
use std::time::Duration;

use junction_proto::v1::read_request::Start;
use junction_proto::v1::{ReadRequest, StartPosition};
use tokio::time::Instant;
use tonic::transport::Endpoint;

use crate::checker::{Replica, ReplicaRead, StoredEntry};
use crate::cluster::Cluster;

/// Where a partition lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLayout {
    pub partition: u32,
    pub group: u64,
    pub replicas: Vec<u64>,
}

/// Waits until every node answers and, for every partition, every replica reports the same
/// `next_offset` and a leader is known — twice in a row. Returns the offsets, or a
/// description of what had not converged when `limit` passed.
pub async fn wait_converged(
    cluster: &mut Cluster,
    layout: &[PartitionLayout],
    limit: Duration,
) -> Result<BTreeMap<u32, u64>, String> {
    let deadline = Instant::now() + limit;
    let mut previous: Option<BTreeMap<u32, u64>> = None;
    loop {
        let statuses = cluster.statuses().await;
        let mut problems = Vec::new();
        let missing: Vec<u64> = cluster
            .ids()
            .into_iter()
            .filter(|id| !statuses.contains_key(id))
            .collect();
        if !missing.is_empty() {
            problems.push(format!("nodes {missing:?} do not answer"));
        }
        let mut offsets = BTreeMap::new();
        for part in layout {
            let mut seen = BTreeMap::new();
            let mut leader = None;
            for r in &part.replicas {
                let g = statuses
                    .get(r)
                    .and_then(|s| s.groups.iter().find(|g| g.group == part.group));
                if let Some(g) = g {
                    seen.insert(*r, g.next_offset);
                    leader = leader.or(g.leader);
                }
            }
            let distinct: std::collections::BTreeSet<u64> = seen.values().copied().collect();
            if seen.len() != part.replicas.len() || distinct.len() != 1 || leader.is_none() {
                problems.push(format!(
                    "partition {} (group {}): next offsets by replica {seen:?}, leader {leader:?}",
                    part.partition, part.group
                ));
            } else if let Some(&o) = distinct.iter().next() {
                offsets.insert(part.partition, o);
            }
        }
        if problems.is_empty() {
            if previous.as_ref() == Some(&offsets) {
                return Ok(offsets);
            }
            previous = Some(offsets);
        } else {
            previous = None;
            if Instant::now() >= deadline {
                return Err(problems.join("; "));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Reads every partition from each of its replicas.
pub async fn read_replicas(
    addrs: &BTreeMap<u64, String>,
    station: &str,
    layout: &[PartitionLayout],
    access: &crate::access::Access,
) -> BTreeMap<u32, Vec<ReplicaRead>> {
    let mut out = BTreeMap::new();
    for part in layout {
        let mut reads = Vec::new();
        for &node in &part.replicas {
            let result = match addrs.get(&node) {
                Some(addr) => read_replica(addr, node, station, part.partition, access).await,
                None => Err(format!("no address for node {node}")),
            };
            reads.push(ReplicaRead { node, result });
        }
        out.insert(part.partition, reads);
    }
    out
}

async fn read_replica(
    addr: &str,
    node: u64,
    station: &str,
    partition: u32,
    access: &crate::access::Access,
) -> Result<Replica, String> {
    let endpoint = Endpoint::from_shared(addr.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2));
    let mut client = access
        .broker(endpoint)
        .map_err(|e| e.to_string())?
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let mut start = Start::Position(StartPosition::Earliest as i32);
    let mut entries = Vec::new();
    let mut start_offset = None;
    for _page in 0..1_000_000 {
        let req = ReadRequest {
            station: station.to_owned(),
            partition,
            start: Some(start),
            max_messages: 1000,
            max_bytes: 0,
            local_replica: true,
        };
        let mut last_err = String::new();
        let mut resp = None;
        for _try in 0..5 {
            match tokio::time::timeout(Duration::from_secs(10), client.read(req.clone())).await {
                Ok(Ok(r)) => {
                    resp = Some(r.into_inner());
                    break;
                }
                Ok(Err(s)) => last_err = format!("{:?}: {}", s.code(), s.message()),
                Err(_) => last_err = "read timed out".to_owned(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let Some(resp) = resp else {
            return Err(format!("reading from node {node} failed: {last_err}"));
        };
        start_offset.get_or_insert(resp.start_offset);
        if resp.messages.is_empty() {
            if resp.next_offset >= resp.high_watermark {
                return Ok(Replica {
                    node,
                    start_offset: start_offset.unwrap_or(0),
                    entries,
                });
            }
            return Err(format!(
                "node {node} returned no messages at offset {} below its high watermark {}",
                resp.next_offset, resp.high_watermark
            ));
        }
        for m in resp.messages {
            entries.push(StoredEntry {
                offset: m.offset,
                key: m.key,
                payload: m.payload.to_vec(),
            });
        }
        start = Start::Offset(resp.next_offset);
    }
    Err(format!("node {node}: too many pages"))
}
