//! The Rust SDK of Junction, a Raft-replicated log store.
//!
//! Contract:
//! - [`Client::connect`] (not async) takes seed addresses (`host:port` or `http://host:port`)
//!   and connects lazily; a [`Client`] is cheap to clone and clones share one channel per
//!   address. Leader hints add addresses to the ones it knows.
//! - Every call is retried on UNAVAILABLE and on connection failures, on the next known
//!   address, with exponential backoff (50 ms doubling to 1 s) until
//!   [`ClientOptions::retry_deadline`] (30 s by default) passes; the call then fails with
//!   [`ClientError::RetriesExhausted`]. A status carrying an `ErrorInfo` with reason
//!   `NOT_LEADER` and metadata `leader_addr` is retried at that address first. Every other
//!   status fails at once as [`ClientError::Status`]; [`ClientError::code`] gives its code.
//! - [`Client::produce`] (one batch, one call) is at-least-once: a retried batch whose first
//!   attempt's outcome was unknown may be stored twice (give messages a `msg_id` and the
//!   station a dedup window to drop such copies). The [`Producer`] is idempotent by default:
//!   its retries are stored once. Creating tenants or stations may report ALREADY_EXISTS after
//!   a retry, and deleting a station NOT_FOUND.
//! - [`Client::tail`] opens its stream at once (in a background task, so it needs a Tokio
//!   runtime) and re-opens it when it breaks, resuming after the last message delivered.
//! - [`Client::producer`] spawns a [`Producer`]'s background task (Tokio runtime needed); it
//!   partitions messages itself and pipelines each partition's batches to its leader, see
//!   its documentation.
//! - [`Client::pipeline`] consumes a station in a group and produces to another effectively
//!   once (see [`Pipeline`]).
//!
//! - [`Client::group_consumer`] joins a consumer group run by the cluster and consumes the
//!   partitions assigned to it (see [`GroupConsumer`]); the other group calls
//!   (`create_group`, `describe_group`, `seek_group`, `clone_group`, `delete_group`,
//!   `resend_dead_letters`) are plain retried calls.
//!
//! The wire types are those of `junction_proto::v1`, re-exported as [`proto`].

mod admin;
mod batch;
mod broker;
mod client;
mod error;
mod group;
mod pipeline;
mod producer;
mod retry;
mod schemas;
mod tail;

pub use admin::StationSpec;
pub use broker::Start;
pub use client::{AuthedChannel, Bearer, Client, ClientOptions};
pub use error::ClientError;
pub use group::{Acker, FENCED_REASON, GroupConsumer, GroupMessage, GroupOptions};
pub use junction_proto::v1 as proto;
pub use junction_proto::v1::{
    ClusterStatusResponse, Header, Message, MessagePosition, NodeInfo, PartitionInfo, ReadResponse,
    StationInfo, StoredMessage,
};
pub use pipeline::{Completer, Pipeline, PipelineOptions, output_msg_id};
pub use producer::{Producer, ProducerOptions, SendFuture};
pub use retry::{LEADER_ADDR_KEY, NOT_LEADER_REASON, THROTTLED_REASON};
pub use schemas::SchemaSpec;
pub use tail::{TAIL_BUFFER, TailStream};
pub use tonic::Code;
