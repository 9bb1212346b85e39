//! `junction station ...`

use anyhow::Context;
use junction_client::StationSpec;
use junction_client::proto::StationInfo;

use crate::common::{
    ConnArgs, Table, format_time_ms, full_name, id_list, leader_cell, out, out_json, station_json,
};
use crate::policy::{PolicyArgs, policy_rows};

/// Create, list, describe and delete stations.
#[derive(clap::Args, Debug)]
pub struct StationArgs {
    #[command(subcommand)]
    pub command: StationCommand,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum StationCommand {
    /// Create a station (NAME or TENANT/NAME).
    Create {
        name: String,
        /// Number of partitions (1 to 1024).
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Replicas of each partition: 1, 3 or 5 (use 1 on a single-node cluster).
        #[arg(long, default_value_t = 3)]
        replication_factor: u32,
        /// Largest accepted message in bytes [default: the server's maximum].
        #[arg(long)]
        max_message_bytes: Option<u32>,
        /// Validate produced messages with this schema of the station's tenant: SCHEMA (the
        /// latest version, following new ones) or SCHEMA@VERSION.
        #[arg(long)]
        schema: Option<String>,
        /// With --schema: reject (an invalid message fails its batch) or dead_letter (it goes
        /// to the dead-letter station NAME.dls, the rest is stored).
        #[arg(long, default_value = "reject", requires = "schema")]
        on_invalid: String,
        #[command(flatten)]
        policy: Box<PolicyArgs>,
    },
    /// Change a station's retention, discard and compaction settings (unset flags keep
    /// their value; `none` removes a limit).
    Update {
        name: String,
        #[command(flatten)]
        policy: Box<PolicyArgs>,
    },
    /// List stations.
    List {
        /// Only this tenant's stations.
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a station and its partitions.
    Describe {
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a station and all its messages.
    Delete { name: String },
    /// Move partition replicas (a few at a time, each a Raft membership change) until every
    /// node holds within one replica of the others, e.g. after adding nodes.
    Rebalance {
        /// Wait until the rebalance has finished.
        #[arg(long)]
        wait: bool,
        /// Longest wait, in seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
}

pub(crate) async fn run(args: StationArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        StationCommand::Create {
            name,
            partitions,
            replication_factor,
            max_message_bytes,
            schema,
            on_invalid,
            policy,
        } => {
            let mut spec = StationSpec::new(&name)
                .partitions(partitions)
                .replication_factor(replication_factor)
                .max_message_bytes(max_message_bytes.unwrap_or(0));
            if let Some(schema) = &schema {
                let (schema, version) = crate::schema::schema_ref(schema)?;
                spec = spec.schema(&schema, version, &on_invalid);
            }
            if policy.any() {
                spec = spec.policy(policy.apply(Default::default())?);
            }
            let station = client
                .create_station_with(spec)
                .await
                .with_context(|| format!("creating station {name}"))?;
            out(&format!(
                "created station {} ({} partitions, replication factor {})\n",
                full_name(&station),
                station.partitions,
                station.replication_factor
            ))
        }
        StationCommand::Update { name, policy } => {
            if !policy.any() {
                anyhow::bail!(
                    "nothing to update: give at least one of --retention-age, --retention-bytes, --retention-messages, --retention-ack, --compaction, --discard, --tombstone-delay, --dedup-window, --dedup-max-ids, --producer-expiry"
                );
            }
            let current = client
                .describe_station(&name)
                .await
                .with_context(|| format!("reading station {name}"))?;
            let new = policy.apply(current.policy.unwrap_or_default())?;
            let station = client
                .update_station(&name, new)
                .await
                .with_context(|| format!("updating station {name}"))?;
            let rows: Vec<String> = policy_rows(&station)
                .into_iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            out(&format!(
                "updated station {}: {}\n",
                full_name(&station),
                rows.join("; ")
            ))
        }
        StationCommand::List { tenant, json } => {
            let stations = client
                .list_stations(tenant.as_deref())
                .await
                .context("listing stations")?;
            if json {
                return out_json(&stations.iter().map(station_json).collect());
            }
            if stations.is_empty() {
                return out("no stations\n");
            }
            let mut table = Table::new([
                "STATION",
                "PARTITIONS",
                "REPLICATION",
                "MAX MESSAGE",
                "CREATED",
            ]);
            for s in &stations {
                table.row(vec![
                    full_name(s),
                    s.partitions.to_string(),
                    s.replication_factor.to_string(),
                    max_message(s),
                    format_time_ms(s.created_at_ms),
                ]);
            }
            out(&table.render())
        }
        StationCommand::Describe { name, json } => {
            let station = client
                .describe_station(&name)
                .await
                .with_context(|| format!("describing station {name}"))?;
            if json {
                out_json(&station_json(&station))
            } else {
                out(&describe_text(&station))
            }
        }
        StationCommand::Delete { name } => {
            client
                .delete_station(&name)
                .await
                .with_context(|| format!("deleting station {name}"))?;
            out(&format!("deleted station {name}\n"))
        }
        StationCommand::Rebalance { wait, timeout_secs } => {
            let planned = client.rebalance().await.context("starting a rebalance")?;
            if !wait {
                return out(&format!(
                    "rebalancing: {planned} replica move(s) planned (`junction cluster status` \
                     shows the moves in progress)\n"
                ));
            }
            let done = crate::common::wait_for_status(&client, timeout_secs, |s| {
                !s.rebalancing && s.moves_in_progress == 0
            })
            .await
            .context("waiting for the rebalance to finish")?;
            let counts: Vec<String> = done
                .nodes
                .iter()
                .map(|n| format!("node {}: {}", n.id, n.partition_replicas))
                .collect();
            out(&format!(
                "rebalanced ({planned} move(s) planned); replicas per node: {}\n",
                counts.join(", ")
            ))
        }
    }
}

fn max_message(s: &StationInfo) -> String {
    if s.max_message_bytes == 0 {
        "default".to_owned()
    } else {
        format!("{} B", s.max_message_bytes)
    }
}

fn describe_text(s: &StationInfo) -> String {
    let mut header = Table::new(["station", &full_name(s)]);
    header.row(vec!["partitions".into(), s.partitions.to_string()]);
    header.row(vec!["replication".into(), s.replication_factor.to_string()]);
    header.row(vec!["max message".into(), max_message(s)]);
    header.row(vec!["created".into(), format_time_ms(s.created_at_ms)]);
    for (k, v) in policy_rows(s) {
        header.row(vec![k, v]);
    }
    if !s.schema.is_empty() {
        header.row(vec![
            "schema".into(),
            format!("{} (on invalid: {})", s.schema, s.on_invalid),
        ]);
    }
    let mut table = Table::new([
        "PARTITION",
        "LEADER",
        "REPLICAS",
        "START OFFSET",
        "NEXT OFFSET",
        "MESSAGES",
        "BYTES",
        "PRODUCERS",
        "DEDUP IDS",
    ]);
    for p in &s.partition_info {
        table.row(vec![
            p.partition.to_string(),
            leader_cell(p.leader),
            id_list(&p.replicas),
            p.start_offset.to_string(),
            p.next_offset.to_string(),
            p.messages.to_string(),
            p.bytes.to_string(),
            p.producers.to_string(),
            format!("{} ({} B)", p.dedup_ids, p.dedup_id_bytes),
        ]);
    }
    let mut lost = String::new();
    for p in &s.partition_info {
        if let Some(at) = p.data_lost_at_ms {
            lost.push_str(&format!(
                "partition {} lost every replica at {} (memory storage) and restarted empty\n",
                p.partition,
                format_time_ms(at)
            ));
        }
    }
    format!("{}\n{}{lost}", header.render(), table.render())
}
