//! Junction's use of openraft: one type configuration for every group, the RocksDB-backed
//! log store and state machines, snapshots streamed from RocksDB, and the gRPC transport that
//! carries every group's Raft RPCs between nodes.
//!
//! - [`types`]: `TypeConfig` and aliases; [`tuning`]: the openraft `Config` we run with.
//! - [`log_store`]: `RaftLogStorage` over the shared RocksDB, one key range per group.
//! - [`partition_sm`] / [`meta_sm`]: the partition (message log) and metadata state machines.
//! - [`snapshot`]: snapshot data — dumped lazily from RocksDB on the sender, spooled to a file
//!   on the receiver; never held in memory whole.
//! - [`tail`]: the in-memory window of recently applied messages that tail readers use.
//! - [`network`]: `RaftNetworkV2` over the `Peer` gRPC service; [`peer_service`]: its server.
//!
//! Depends on types, proto and storage; knows nothing of stations, produce or read requests.

pub mod compaction;
pub mod format;
pub mod log_store;
pub mod meta_sm;
pub mod network;
pub mod partition_sm;
pub mod peer_auth;
pub mod peer_service;
pub mod pointers;
pub mod promotion;
pub mod quiesce;
pub mod rejoin;
mod sm_common;
pub mod snapshot;
pub mod tail;
pub mod tuning;
pub mod types;

pub use log_store::LogStore;
pub use meta_sm::{MetaShared, MetaStateMachine};
pub use network::{
    DEFAULT_PEER_PORT_OFFSET, DialError, DialOverrides, NetworkFactory, PeerChannel, PeerPool,
    peer_address,
};
pub use partition_sm::{PartitionShared, PartitionState, PartitionStateMachine};
pub use peer_service::{GroupHost, PeerService};
pub use snapshot::SnapshotData;
pub use tail::{TailBudget, TailWindow};
pub use tuning::RaftTuning;
pub use types::*;

/// Errors of this crate's own code (openraft's errors are passed through as they are).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RaftStoreError {
    #[error(transparent)]
    Storage(#[from] junction_storage::StorageError),
    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        source: postcard::Error,
    },
    #[error("bad snapshot stream: {0}")]
    BadSnapshot(&'static str),
    #[error("bad cluster secret: {0}")]
    ClusterSecret(String),
    #[error(
        "{what} is in format version {found}; this build reads version {supported} (written by a \
         newer Junction?)"
    )]
    Version {
        what: &'static str,
        found: u8,
        supported: u8,
    },
    #[error("cannot decode {what}: {detail}")]
    Format { what: &'static str, detail: String },
    #[error(
        "cluster mismatch: this node's data belongs to cluster {ours}, the peer's to cluster \
         {theirs}"
    )]
    ClusterMismatch { ours: String, theirs: String },
    /// Stored bytes that fail their checksum: corrupted on this node's disk.
    #[error("corrupt {what}: {detail}")]
    Corrupt { what: &'static str, detail: String },
}

/// Whether an error's text names a [`RaftStoreError::Corrupt`] of a log entry or a stored
/// record. openraft keeps a storage error that stopped a group only as text.
pub fn names_corruption(text: &str) -> bool {
    [
        "corrupt log entry",
        "corrupt stored record",
        "corrupt segment",
        "corrupt message",
    ]
    .iter()
    .any(|mark| text.contains(mark))
}

impl From<RaftStoreError> for std::io::Error {
    fn from(e: RaftStoreError) -> Self {
        std::io::Error::other(e)
    }
}

pub use format::{Format, decode, decode_record, encode, encode_record};

/// The `tracing` target of every span Junction exports over OTLP (see the server's
/// `telemetry` module): nothing else subscribes to it, so without an exporter these spans
/// cost nothing.
pub const TRACE_TARGET: &str = "junction::trace";
