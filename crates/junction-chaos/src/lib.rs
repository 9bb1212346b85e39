//! `junction chaos`: starts a real cluster of `junction serve` processes, runs a checkable
//! workload, injects faults drawn from a seed, heals, and checks that nothing acknowledged was
//! lost, reordered or invented, and that every replica holds the same bytes.
//!
//! Public API: [`ChaosArgs`] (the subcommand's flags) and [`run`], which returns `Ok(true)`
//! when no violation was found, `Ok(false)` when one was, and `Err` when the run itself could
//! not be carried out (cluster did not start, output not writable, ...).
//!
//! A run: print the seed and the schedule; start the nodes (a private copy of the binary,
//! data in a temp dir, every node-to-node link through its own [`proxy`]); create a station;
//! run producers and one tailing reader per partition; inject the faults one at a time; heal
//! everything; wait until every partition takes writes again; stop the producers; wait until
//! the replicas converge; read every partition from every replica; check; write
//! `history.json`, `results.json` and `timeline.svg` to `--out`. The same `--seed` (with the
//! same flags) gives the same schedule; `--faults KIND,...` restricts the kinds, which is how
//! a failing seed becomes a focused regression run.
//!
//! Modules: [`access`] (the clients' TLS and credential), [`schedule`] (seeded faults, pure) and [`rng`], [`proxy`] (fault-injecting TCP
//! proxy), [`cluster`] (processes) and [`disk`] (tmpfs per node), [`nemesis`] (executing
//! faults), [`workload`], [`history`], [`verify`] (convergence and replica reads), [`checker`]
//! (pure), [`report`] and [`svg`].

pub mod access;
pub mod checker;
pub mod cluster;
pub mod disk;
#[cfg(test)]
mod fixtures;
pub mod group_check;
pub mod history;
pub mod nemesis;
pub mod pipeline_check;
pub mod proxy;
pub mod report;
pub mod rng;
pub mod schedule;
pub mod svg;
pub mod verify;
pub mod workload;

mod args;
mod runner;

pub use args::{ChaosArgs, parse_duration};
pub use runner::run;
