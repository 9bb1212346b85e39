//! Generated protobuf and gRPC code for Junction's public API (`junction.v1`) and its
//! node-to-node service (`junction.peer.v1`). Nothing else lives here: conversions to domain
//! types belong to the crates that own those types.

#![allow(clippy::all, missing_docs)]

/// The public API: `Broker` (produce/read) and `Admin` (stations, tenants, cluster).
pub mod v1 {
    tonic::include_proto!("junction.v1");
}

/// The node-to-node service that carries every Raft group's RPCs.
pub mod peer {
    tonic::include_proto!("junction.peer.v1");
}

/// The encoded descriptor set of both packages, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/junction_descriptor.bin"));
