//! The `junction` command line: client commands (stations, tenants, produce, read, cluster
//! status) built on `junction-client`, and `junction dev`, which runs a local cluster of
//! `junction serve` child processes.
//!
//! The binary flattens [`ClientCommand`] into its own subcommands and calls [`run_client`];
//! `junction dev` parses [`DevArgs`] and calls [`run_dev`]. Every client command takes
//! `--server ADDR[,ADDR...]` (env `JUNCTION_SERVER`, default [`DEFAULT_SERVERS`]). Output is
//! for humans (aligned columns) unless `--json` is given.

mod auth;
mod cluster;
mod common;
mod dev;
mod group;
mod policy;
mod produce;
mod read;
mod schema;
mod station;
mod tenant;

pub use auth::{AuthArgs, AuthCommand, KeyCommand};
pub use cluster::{ClusterArgs, ClusterCommand};
pub use common::{ConnArgs, DEFAULT_SERVERS};
pub use dev::{DevArgs, run_dev};
pub use group::{ConsumeArgs, DlsArgs, DlsCommand, GroupArgs, GroupCommand};
pub use produce::ProduceArgs;
pub use read::ReadArgs;
pub use schema::{SchemaArgs, SchemaCommand};
pub use station::{StationArgs, StationCommand};
pub use tenant::{TenantArgs, TenantCommand};

/// The client commands.
#[derive(clap::Subcommand, Debug)]
pub enum ClientCommand {
    /// Create, list, describe and delete stations.
    Station(StationArgs),
    /// Create and list tenants.
    Tenant(TenantArgs),
    /// API keys (create, list, revoke) and `whoami`.
    Auth(AuthArgs),
    /// Send one message per line of standard input.
    Produce(ProduceArgs),
    /// Print a station's messages.
    Read(ReadArgs),
    /// Inspect the cluster.
    Cluster(ClusterArgs),
    /// Consume a station as a member of a consumer group (acks what it prints).
    Consume(ConsumeArgs),
    /// List, describe, seek, clone and delete consumer groups.
    Group(GroupArgs),
    /// List and re-send dead letters.
    Dls(DlsArgs),
    /// The schema registry: register, check, list, describe, delete; bind stations.
    Schema(SchemaArgs),
}

/// Runs one client command.
pub async fn run_client(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Station(args) => station::run(args).await,
        ClientCommand::Tenant(args) => tenant::run(args).await,
        ClientCommand::Auth(args) => auth::run(args).await,
        ClientCommand::Produce(args) => produce::run(args).await,
        ClientCommand::Read(args) => read::run(args).await,
        ClientCommand::Cluster(args) => cluster::run(args).await,
        ClientCommand::Consume(args) => group::consume(args).await,
        ClientCommand::Group(args) => group::group(args).await,
        ClientCommand::Dls(args) => group::dls(args).await,
        ClientCommand::Schema(args) => schema::run(args).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(clap::Parser, Debug)]
    #[command(name = "junction")]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    // Parsed once per test; its size does not matter.
    #[allow(clippy::large_enum_variant)]
    #[derive(clap::Subcommand, Debug)]
    enum Command {
        #[command(flatten)]
        Client(ClientCommand),
        Dev(DevArgs),
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn server_option_works_after_subcommands() {
        let cli = Cli::try_parse_from([
            "junction",
            "station",
            "create",
            "demo",
            "--partitions",
            "3",
            "--server",
            "a:1,b:2",
        ])
        .unwrap();
        let Command::Client(ClientCommand::Station(args)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(args.conn.addresses(), vec!["a:1", "b:2"]);
        assert!(matches!(
            args.command,
            StationCommand::Create {
                partitions: 3,
                replication_factor: 3,
                ..
            }
        ));
    }

    #[test]
    fn read_and_produce_parse() {
        let cli = Cli::try_parse_from([
            "junction", "read", "demo", "--from", "latest", "--follow", "--count", "5",
        ])
        .unwrap();
        let Command::Client(ClientCommand::Read(args)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(args.from, junction_client::Start::Latest);
        assert!(args.follow);
        let cli = Cli::try_parse_from([
            "junction",
            "produce",
            "demo",
            "--key-sep",
            "TAB",
            "--header",
            "a=b",
            "--header",
            "c=d",
        ])
        .unwrap();
        let Command::Client(ClientCommand::Produce(args)) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(args.headers.len(), 2);
        assert!(
            Cli::try_parse_from([
                "junction",
                "produce",
                "demo",
                "--key",
                "k",
                "--key-sep",
                ","
            ])
            .is_err()
        );
    }
}
