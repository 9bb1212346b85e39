//! The HTTP side: `/healthz` (the process serves), `/readyz` (the node has joined a cluster
//! with a metadata leader and is not being removed), `/metrics` (Prometheus), the REST API
//! under `/api/v1` ([`crate::rest`]), and the web console at `/` ([`crate::console`]).

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use junction_broker::Broker;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide Prometheus recorder. The `metrics` facade is global by design; every node
/// in one process (tests) reports into the same registry.
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| PrometheusBuilder::new().install_recorder().ok())
        .as_ref()
}

/// Installs the recorder (idempotent).
pub fn init_metrics() {
    let _ = prometheus();
}

/// Returns the HTTP router: probes, metrics, and the REST API.
pub fn router(broker: Arc<Broker>, rest: Arc<crate::rest::Rest>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(broker)
        .merge(crate::rest::router(rest))
        .merge(crate::console::router())
}

async fn readyz(State(broker): State<Arc<Broker>>) -> (StatusCode, String) {
    // A node being removed takes no new clients: its metadata stops following the cluster
    // once it has left.
    if broker.is_removed() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: this node was removed from the cluster (to bring it back, start it with \
             an empty data directory and it joins as a new node)\n"
                .into(),
        );
    }
    if broker
        .metadata()
        .reconfig
        .draining
        .contains(&broker.node_id())
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: this node is being removed from the cluster\n".into(),
        );
    }
    match broker.meta_leader() {
        (Some(leader), term) => (
            StatusCode::OK,
            format!("ready: metadata leader {leader}, term {term}\n"),
        ),
        (None, _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no metadata leader\n".into(),
        ),
    }
}

async fn metrics_page(State(broker): State<Arc<Broker>>) -> (StatusCode, String) {
    let status = broker.local_status();
    let node = broker.node_id();
    let node_label = node.to_string();
    let mut leaders = 0u64;
    let quiet = status.groups.iter().filter(|g| g.quiet).count();
    for g in &status.groups {
        let group = g.group.to_string();
        let is_leader = g.leader == Some(node);
        if is_leader && g.group != 0 {
            leaders += 1;
        }
        metrics::gauge!("junction_raft_term", "node" => node_label.clone(), "group" => group.clone()).set(g.term as f64);
        metrics::gauge!("junction_raft_is_leader", "node" => node_label.clone(), "group" => group.clone())
            .set(if is_leader { 1.0 } else { 0.0 });
        if g.group != 0 {
            metrics::gauge!("junction_partition_next_offset", "node" => node_label.clone(), "group" => group)
                .set(g.next_offset as f64);
        }
    }
    metrics::gauge!("junction_partition_replicas", "node" => node_label.clone())
        .set((status.groups.len().saturating_sub(1)) as f64);
    metrics::gauge!("junction_partition_leaders", "node" => node_label.clone()).set(leaders as f64);
    // Partition replicas whose Raft timers are stopped (see junction_raft::quiesce).
    metrics::gauge!("junction_partition_quiet", "node" => node_label.clone()).set(quiet as f64);
    // Recently applied messages kept in memory for tail readers (see junction_raft::tail).
    let (tail_used, tail_limit) = broker.tail_window_bytes();
    metrics::gauge!("junction_tail_window_bytes", "node" => node_label.clone())
        .set(tail_used as f64);
    metrics::gauge!("junction_tail_window_limit_bytes", "node" => node_label.clone())
        .set(tail_limit as f64);
    // Bytes the store wrote, by cause (RocksDB's WAL, flushes and compactions, and the
    // partition logs' segment files): with the bytes produced, this gives write amplification.
    let written = broker.store().written_bytes();
    for (cause, bytes) in [
        ("wal", written.wal),
        ("flush", written.flush),
        ("compaction", written.compaction),
        ("segments", written.segments),
    ] {
        metrics::counter!("junction_storage_written_bytes_total", "node" => node_label.clone(), "cause" => cause)
            .absolute(bytes);
    }
    // Consumer group lag, exported by each partition's leader.
    for (station, group, partition, pos) in broker.led_group_positions() {
        let labels = [
            ("station", station),
            ("group", group),
            ("partition", partition.to_string()),
        ];
        metrics::gauge!("junction_group_lag_messages", &labels).set(pos.lag as f64);
        metrics::gauge!("junction_group_oldest_unacked_age_seconds", &labels)
            .set(pos.oldest_unacked_age_ms as f64 / 1000.0);
        metrics::gauge!("junction_group_committed_offset", &labels).set(pos.committed as f64);
        metrics::gauge!("junction_group_parked_keys", &labels).set(pos.parked_keys as f64);
        metrics::gauge!("junction_group_detached", &labels).set(if pos.detached_at_ms.is_some() {
            1.0
        } else {
            0.0
        });
    }
    match prometheus() {
        Some(h) => (StatusCode::OK, h.render()),
        None => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics recorder unavailable\n".into(),
        ),
    }
}
