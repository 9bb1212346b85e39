//! Integration tests: real nodes (in-process, or real `junction serve` processes) on
//! ephemeral loopback ports, real RocksDB in temp dirs.

mod auth;
mod bad_input;
mod bench;
mod cli;
mod client;
mod cluster;
mod exactly_once;
mod failover;
mod format_level;
mod groups;
mod harness;
mod lanes;
mod memory;
mod parking;
mod process;
mod quiescence;
mod quota;
mod reconfig;
mod rest;
mod retention;
mod schemas;
mod snapshot;
mod tail_window;
mod tls;
mod traces;
