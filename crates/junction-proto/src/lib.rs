//! Generated protobuf and gRPC code for Junction's public API (`junction.v1`) and its
//! node-to-node service (`junction.peer.v1`). Nothing else lives here: conversions to domain
//! types belong to the crates that own those types.

#![allow(clippy::all, missing_docs)]

/// Nested by package, as the generated code's cross-package paths expect.
mod generated {
    pub mod junction {
        /// The public API: `Broker` (produce/read) and `Admin` (stations, tenants, cluster).
        pub mod v1 {
            tonic::include_proto!("junction.v1");
        }

        pub mod peer {
            /// The node-to-node service that carries every Raft group's RPCs.
            pub mod v1 {
                tonic::include_proto!("junction.peer.v1");
            }
        }
    }
}

pub use generated::junction::peer::v1 as peer;
pub use generated::junction::v1;

/// HTTP/2 flow-control window of one stream, for every Junction server and client.
///
/// HTTP/2's default is 64 KiB: a produce batch, an AppendEntries or a read reply bigger than
/// that stalls until the receiver's WINDOW_UPDATE arrives, which on Linux loopback was
/// measured at ~40 ms per stall (a 100 × 1 KiB batch at one in flight: p50 48 ms, against
/// 6.6 ms for 50 × 1 KiB). A window larger than any batch removes the stall.
pub const HTTP2_STREAM_WINDOW: u32 = 8 << 20;
/// HTTP/2 flow-control window of one connection (shared by its streams).
pub const HTTP2_CONNECTION_WINDOW: u32 = 32 << 20;

/// The encoded descriptor set of both packages, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/junction_descriptor.bin"));
