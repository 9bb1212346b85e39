//! `junction consume`, `junction group ...` and `junction dls ...`: consumer groups from the
//! command line.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use junction_client::proto::{
    GroupInfo, GroupMode, GroupSettings, LagBudget, OnMaxDeliveries, SetIsolationResponse,
    StartPosition, group_settings, seek_group_request,
};
use junction_client::{GroupOptions, Start};
use serde_json::json;

use crate::common::{ConnArgs, Table, format_time_ms, message_json, out, out_json};
use crate::read::parse_start;

/// Consume a station as a member of a consumer group, acknowledging what is printed.
#[derive(clap::Args, Debug)]
pub struct ConsumeArgs {
    /// The station (NAME or TENANT/NAME).
    pub station: String,
    /// The consumer group (created on first use).
    #[arg(long, short = 'g')]
    pub group: String,
    /// Where a new group starts: `earliest`, `latest`, an offset, or `@MS`.
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    pub from: Start,
    /// Stop after this many messages [default: run until Ctrl-C].
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no message arrived for this many seconds.
    #[arg(long)]
    pub idle_exit: Option<u64>,
    /// A new group's ack wait, in seconds.
    #[arg(long, default_value_t = 30)]
    pub ack_wait: u64,
    /// A new group's deliveries before a message goes to the dead-letter station.
    #[arg(long, default_value_t = 5)]
    pub max_deliveries: u32,
    /// How a new group's members share partitions: `partitioned` (one member per partition)
    /// or `key_shared` (every member gets a share of every partition's keys, each key's order
    /// kept). Joining an existing group with another mode is refused [default: the group's
    /// mode, or partitioned for a new group].
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<GroupMode>,
    /// A new group's messages of one key in flight at once.
    #[arg(long, default_value_t = 1)]
    pub max_in_flight_per_key: u32,
    /// What a new group does with a message whose deliveries are used up: `dead_letter` it,
    /// or `park` its key (the key waits, in order, for `junction group resume` or `skip`).
    #[arg(long, value_parser = parse_on_max_deliveries)]
    pub on_max_deliveries: Option<OnMaxDeliveries>,
    /// One JSON object per line (with `delivery_count`).
    #[arg(long)]
    pub json: bool,
    /// Run this command (`sh -c`) for each message instead of printing it: the payload on its
    /// stdin; `JUNCTION_STATION`, `JUNCTION_PARTITION`, `JUNCTION_OFFSET`, `JUNCTION_KEY` and
    /// `JUNCTION_DELIVERY` in its environment. Exit status 0 acks the message; anything else
    /// nacks it (delivered again after --retry-delay, until the group's max deliveries).
    /// `--count` then counts acknowledged messages.
    #[arg(long, conflicts_with = "json")]
    pub exec: Option<String>,
    /// With --exec: commands running at once. The cluster sends a key's next message only
    /// once the previous one is finished, so each key keeps its order.
    #[arg(long, default_value_t = 1, requires = "exec")]
    pub concurrency: usize,
    /// With --exec: how long a failed message waits before it is delivered again, in ms.
    #[arg(long, default_value_t = 1000, requires = "exec")]
    pub retry_delay_ms: u64,
    #[command(flatten)]
    pub conn: ConnArgs,
}

fn parse_mode(s: &str) -> Result<GroupMode, String> {
    match s {
        "partitioned" => Ok(GroupMode::Partitioned),
        "key_shared" | "key-shared" => Ok(GroupMode::KeyShared),
        other => Err(format!(
            "unknown mode '{other}': use partitioned or key_shared"
        )),
    }
}

fn parse_on_max_deliveries(s: &str) -> Result<OnMaxDeliveries, String> {
    match s {
        "dead_letter" | "dead-letter" => Ok(OnMaxDeliveries::DeadLetter),
        "park" => Ok(OnMaxDeliveries::Park),
        other => Err(format!(
            "unknown --on-max-deliveries '{other}': use dead_letter or park"
        )),
    }
}

fn on_max_deliveries_name(v: i32) -> &'static str {
    match OnMaxDeliveries::try_from(v) {
        Ok(OnMaxDeliveries::Park) => "park",
        _ => "dead_letter",
    }
}

/// A message key given on the command line.
#[derive(Debug, Clone)]
pub struct KeyArg(pub Vec<u8>);

/// A key as typed: text, or `hex:` followed by hex digits.
fn parse_key(s: &str) -> Result<KeyArg, String> {
    parse_key_bytes(s).map(KeyArg)
}

fn parse_key_bytes(s: &str) -> Result<Vec<u8>, String> {
    match s.strip_prefix("hex:") {
        Some(h) if !h.is_ascii() => Err("a hex key has only the digits 0-9 and a-f".into()),
        Some(h) if h.len() % 2 == 0 => (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).map_err(|e| format!("bad hex key: {e}")))
            .collect(),
        Some(_) => Err("a hex key has an even number of digits".into()),
        None => Ok(s.as_bytes().to_vec()),
    }
}

fn key_text(k: &[u8]) -> String {
    match std::str::from_utf8(k) {
        Ok(t) => t.to_owned(),
        Err(_) => format!("hex:{}", crate::common::hex(k)),
    }
}

fn mode_name(mode: i32) -> &'static str {
    match GroupMode::try_from(mode) {
        Ok(GroupMode::KeyShared) => "key_shared",
        Ok(GroupMode::Partitioned | GroupMode::Unspecified) | Err(_) => "partitioned",
    }
}

/// List, describe, seek, clone and delete consumer groups.
#[derive(clap::Args, Debug)]
pub struct GroupArgs {
    #[command(subcommand)]
    pub command: GroupCommand,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum GroupCommand {
    /// List the groups of a station (or of every station).
    List {
        station: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Settings, members, and per partition the owner, position and lag.
    Describe {
        station: String,
        group: String,
        #[arg(long)]
        json: bool,
    },
    /// Move a group to `earliest`, `latest`, an offset (needs --partition) or `@MS`.
    Seek {
        station: String,
        group: String,
        #[arg(value_parser = parse_start)]
        to: Start,
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Create a new group with the settings and positions of another.
    Clone {
        station: String,
        from: String,
        to: String,
    },
    /// Delete a group.
    Delete { station: String, group: String },
    /// The keys the group parked (`--on-max-deliveries park`), with each one's head message.
    Parked {
        station: String,
        group: String,
        #[arg(long)]
        partition: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Move a parked key's head to the dead-letter station; the key goes on.
    Skip {
        station: String,
        group: String,
        #[arg(long)]
        partition: u32,
        /// The key (text, or `hex:…`).
        #[arg(long, value_parser = parse_key)]
        key: KeyArg,
    },
    /// Deliver a parked key's head again (with fresh deliveries), or every parked key.
    Resume {
        station: String,
        group: String,
        #[arg(long)]
        partition: u32,
        /// The key (text, or `hex:…`).
        #[arg(long, value_parser = parse_key, required_unless_present = "all")]
        key: Option<KeyArg>,
        /// Every parked key of the partition.
        #[arg(long, conflicts_with = "key")]
        all: bool,
    },
    /// Set the group's isolation budget: past it, the group is detached and `ack` retention
    /// no longer waits for it (a dead consumer cannot fill the disk).
    Budget {
        station: String,
        group: String,
        /// Most unacknowledged messages per partition.
        #[arg(long)]
        max_lag_messages: Option<u64>,
        /// Most unacknowledged bytes per partition.
        #[arg(long)]
        max_lag_bytes: Option<u64>,
        /// Oldest unacknowledged message's age (e.g. `30m`, `2h`, `1d`).
        #[arg(long, value_parser = parse_age)]
        max_lag_age: Option<u64>,
        /// One partition only (default: every partition).
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Attach a detached group again: `ack` retention waits for it from its position once more.
    Attach {
        station: String,
        group: String,
        /// One partition only (default: every partition).
        #[arg(long)]
        partition: Option<u32>,
    },
}

fn parse_age(s: &str) -> Result<u64, String> {
    junction_types::policy::parse_duration_ms(s).map_err(|e| e.to_string())
}

fn isolation_text(parts: &[(u32, SetIsolationResponse)]) -> String {
    parts
        .iter()
        .map(|(p, r)| {
            let state = match r.detached_at_ms {
                Some(t) => format!("detached since {}", format_time_ms(t)),
                None => "attached".into(),
            };
            format!(
                "partition {p}: {state}, budget {}",
                budget_text(r.budget.as_ref())
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn budget_text(b: Option<&LagBudget>) -> String {
    let Some(b) = b else {
        return "none".into();
    };
    let mut parts = Vec::new();
    if let Some(m) = b.max_messages {
        parts.push(format!("{m} messages"));
    }
    if let Some(m) = b.max_bytes {
        parts.push(format!("{m} bytes"));
    }
    if let Some(m) = b.max_age_ms {
        parts.push(format!("{:.0} s old", m as f64 / 1000.0));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// List and re-send a station's dead letters.
#[derive(clap::Args, Debug)]
pub struct DlsArgs {
    #[command(subcommand)]
    pub command: DlsCommand,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum DlsCommand {
    /// Print the dead letters of a station (one JSON object per line with --json).
    List {
        station: String,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        count: Option<u64>,
    },
    /// Append dead letters back to their station.
    Resend {
        station: String,
        /// Only this group's dead letters.
        #[arg(long)]
        group: Option<String>,
        /// First dead-letter offset to resend.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Dead-letter offset to stop before [default: the end].
        #[arg(long)]
        to: Option<u64>,
    },
}

fn start_setting(s: Start) -> group_settings::Start {
    match s {
        Start::Earliest => group_settings::Start::Position(StartPosition::Earliest as i32),
        Start::Latest => group_settings::Start::Position(StartPosition::Latest as i32),
        Start::Offset(o) => group_settings::Start::Offset(o),
        Start::Timestamp(t) => group_settings::Start::TimestampMs(t),
    }
}

/// Runs `cmd` for each message, up to `--concurrency` at once, until `--count` messages are
/// acked, `--idle-exit` passes with nothing to do, or Ctrl-C; returns how many were acked.
async fn exec_each(
    consumer: &mut junction_client::GroupConsumer,
    args: &ConsumeArgs,
    cmd: &str,
) -> anyhow::Result<u64> {
    let acker = consumer.acker();
    let retry = Duration::from_millis(args.retry_delay_ms);
    let mut running = tokio::task::JoinSet::new();
    let mut acked = 0u64;
    let mut open = true;
    let idle = args.idle_exit.map(Duration::from_secs);
    loop {
        let wanted = args
            .count
            .is_none_or(|c| acked + (running.len() as u64) < c);
        if (!open || args.count.is_some_and(|c| acked >= c)) && running.is_empty() {
            return Ok(acked);
        }
        let room = open && wanted && running.len() < args.concurrency.max(1);
        let next = async {
            match idle {
                Some(d) => tokio::time::timeout(d, consumer.recv()).await.ok(),
                None => Some(consumer.recv().await),
            }
        };
        tokio::select! {
            m = next, if room => match m {
                Some(Some(m)) => {
                    let (cmd, station) = (cmd.to_owned(), args.station.clone());
                    running.spawn(async move {
                        let r = run_command(&cmd, &station, &m).await;
                        (m, r)
                    });
                }
                // The consumer stopped, or nothing came for --idle-exit.
                Some(None) | None => open = false,
            },
            Some(done) = running.join_next(), if !running.is_empty() => {
                let (m, r) = done.context("a command task failed")?;
                match r {
                    Ok(()) => {
                        acker.ack(&m);
                        acked += 1;
                    }
                    Err(e) => {
                        eprintln!(
                            "partition {} offset {}: {e}; delivered again in {} ms",
                            m.partition(),
                            m.offset(),
                            retry.as_millis()
                        );
                        acker.nack(&m, retry);
                    }
                }
            },
            _ = tokio::signal::ctrl_c() => return Ok(acked),
        }
    }
}

/// Runs `cmd` with the message on stdin; `Err` says how it failed.
async fn run_command(
    cmd: &str,
    station: &str,
    m: &junction_client::GroupMessage,
) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .env("JUNCTION_STATION", station)
        .env("JUNCTION_PARTITION", m.partition().to_string())
        .env("JUNCTION_OFFSET", m.offset().to_string())
        .env("JUNCTION_DELIVERY", m.delivery_count.to_string())
        .env(
            "JUNCTION_KEY",
            m.message
                .key
                .as_deref()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default(),
        )
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = c
        .spawn()
        .map_err(|e| format!("cannot start `{cmd}`: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A command that does not read its input is fine.
        let _ = stdin.write_all(&m.message.payload).await;
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{cmd}` exited with {status}"))
    }
}

pub(crate) async fn consume(args: ConsumeArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let options = GroupOptions {
        settings: GroupSettings {
            start: Some(start_setting(args.from)),
            ack_wait_ms: args.ack_wait.saturating_mul(1000),
            max_deliveries: args.max_deliveries,
            max_in_flight: 0,
            session_timeout_ms: 0,
            mode: args.mode.unwrap_or(GroupMode::Unspecified) as i32,
            max_in_flight_per_key: args.max_in_flight_per_key,
            on_max_deliveries: args
                .on_max_deliveries
                .unwrap_or(OnMaxDeliveries::Unspecified) as i32,
        },
        client: format!("junction-cli pid {}", std::process::id()),
        ..GroupOptions::default()
    };
    let mut consumer = client
        .group_consumer(&args.station, &args.group, options)
        .await
        .with_context(|| format!("joining group {} of {}", args.group, args.station))?;
    if let Some(cmd) = args.exec.clone() {
        let handled = exec_each(&mut consumer, &args, &cmd).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        consumer.close().await.context("leaving the group")?;
        let handled = handled?;
        eprintln!("{handled} message(s) handled");
        return Ok(());
    }
    let mut stdout = std::io::BufWriter::new(std::io::stdout());
    let mut printed = 0u64;
    let idle = args.idle_exit.map(Duration::from_secs);
    while args.count.is_none_or(|c| printed < c) {
        let next = match idle {
            Some(d) => match tokio::time::timeout(d, consumer.recv()).await {
                Ok(m) => m,
                Err(_) => break,
            },
            None => tokio::select! {
                m = consumer.recv() => m,
                _ = tokio::signal::ctrl_c() => break,
            },
        };
        let Some(m) = next else { break };
        let written = if args.json {
            let mut v: serde_json::Value = serde_json::from_str(&message_json(&m.message))?;
            v["delivery_count"] = json!(m.delivery_count);
            writeln!(stdout, "{v}")
        } else {
            stdout
                .write_all(&m.message.payload)
                .and_then(|()| stdout.write_all(b"\n"))
        };
        match written.and_then(|()| stdout.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => return Err(e.into()),
        }
        // Printed, so handled: acknowledge.
        consumer.ack(&m);
        printed += 1;
    }
    // Give the last acks a moment to be replicated, then leave so partitions move at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    consumer.close().await.context("leaving the group")?;
    Ok(())
}

fn group_json(g: &GroupInfo) -> serde_json::Value {
    let s = g.settings.unwrap_or_default();
    json!({
        "station": g.station,
        "group": g.group,
        "generation": g.generation,
        "created_at_ms": g.created_at_ms,
        "settings": {
            "ack_wait_ms": s.ack_wait_ms,
            "max_deliveries": s.max_deliveries,
            "max_in_flight": s.max_in_flight,
            "session_timeout_ms": s.session_timeout_ms,
            "mode": mode_name(s.mode),
            "max_in_flight_per_key": s.max_in_flight_per_key,
            "on_max_deliveries": on_max_deliveries_name(s.on_max_deliveries),
        },
        "members": g.members.iter().map(|m| json!({
            "member_id": m.member_id, "client": m.client, "partitions": m.partitions,
        })).collect::<Vec<_>>(),
        "partitions": g.partitions.iter().map(|p| json!({
            "partition": p.partition, "member_id": p.member_id, "epoch": p.epoch,
            "committed": p.committed, "acked_beyond": p.acked_beyond,
            "high_watermark": p.high_watermark, "lag": p.lag,
            "oldest_unacked_age_ms": p.oldest_unacked_age_ms, "known": p.known,
            "parked_keys": p.parked_keys,
            "budget": p.budget.as_ref().map(|b| json!({
                "max_messages": b.max_messages, "max_bytes": b.max_bytes,
                "max_age_ms": b.max_age_ms,
            })),
            "detached_at_ms": p.detached_at_ms,
        })).collect::<Vec<_>>(),
    })
}

pub(crate) async fn group(args: GroupArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        GroupCommand::List { station, json } => {
            let groups = client
                .list_groups(station.as_deref().unwrap_or(""))
                .await
                .context("listing groups")?;
            if json {
                return out_json(&json!(groups.iter().map(group_json).collect::<Vec<_>>()));
            }
            let mut t = Table::new(["STATION", "GROUP", "MEMBERS", "GENERATION", "CREATED"]);
            for g in &groups {
                t.row(vec![
                    g.station.clone(),
                    g.group.clone(),
                    g.members.len().to_string(),
                    g.generation.to_string(),
                    format_time_ms(g.created_at_ms),
                ]);
            }
            out(&t.render())
        }
        GroupCommand::Describe {
            station,
            group,
            json,
        } => {
            let g = client
                .describe_group(&station, &group)
                .await
                .with_context(|| format!("describing group {group}"))?;
            if json {
                return out_json(&group_json(&g));
            }
            let s = g.settings.unwrap_or_default();
            let mut text = format!(
                "group {} of {}: {}, generation {}, {} member(s), ack wait {} ms, max deliveries {} (then {}), max in flight {}, max in flight per key {}, session timeout {} ms\n\n",
                g.group,
                g.station,
                mode_name(s.mode),
                g.generation,
                g.members.len(),
                s.ack_wait_ms,
                s.max_deliveries,
                on_max_deliveries_name(s.on_max_deliveries),
                s.max_in_flight,
                s.max_in_flight_per_key,
                s.session_timeout_ms
            );
            let shared = mode_name(s.mode) == "key_shared";
            let mut t = Table::new([
                "PARTITION",
                "MEMBER",
                "COMMITTED",
                "ACKED-BEYOND",
                "END",
                "LAG",
                "OLDEST-UNACKED",
                "PARKED",
                "DETACHED",
            ]);
            for p in &g.partitions {
                t.row(vec![
                    p.partition.to_string(),
                    match &p.member_id {
                        Some(m) => m.clone(),
                        None if shared => "(every member)".into(),
                        None => "-".into(),
                    },
                    if p.known {
                        p.committed.to_string()
                    } else {
                        "?".into()
                    },
                    p.acked_beyond.to_string(),
                    p.high_watermark.to_string(),
                    if p.known {
                        p.lag.to_string()
                    } else {
                        "?".into()
                    },
                    format!("{:.1}s", p.oldest_unacked_age_ms as f64 / 1000.0),
                    p.parked_keys.to_string(),
                    match p.detached_at_ms {
                        Some(t) => format!("since {}", format_time_ms(t)),
                        None => "-".into(),
                    },
                ]);
            }
            text.push_str(&t.render());
            let budgets: std::collections::BTreeSet<String> = g
                .partitions
                .iter()
                .filter(|p| p.known)
                .map(|p| budget_text(p.budget.as_ref()))
                .collect();
            text.push_str(&format!(
                "\nisolation budget: {}\n",
                budgets.into_iter().collect::<Vec<_>>().join(" / ")
            ));
            out(&text)
        }
        GroupCommand::Seek {
            station,
            group,
            to,
            partition,
        } => {
            let target = match to {
                Start::Earliest => {
                    seek_group_request::Target::Position(StartPosition::Earliest as i32)
                }
                Start::Latest => seek_group_request::Target::Position(StartPosition::Latest as i32),
                Start::Offset(o) => seek_group_request::Target::Offset(o),
                Start::Timestamp(t) => seek_group_request::Target::TimestampMs(t),
            };
            client
                .seek_group(&station, &group, partition, target)
                .await
                .context("seeking")?;
            out(&format!("group {group} moved"))
        }
        GroupCommand::Clone { station, from, to } => {
            client
                .clone_group(&station, &from, &to)
                .await
                .context("cloning")?;
            out(&format!("group {to} created from {from}"))
        }
        GroupCommand::Delete { station, group } => {
            client
                .delete_group(&station, &group)
                .await
                .context("deleting")?;
            out(&format!("group {group} deleted"))
        }
        GroupCommand::Parked {
            station,
            group,
            partition,
            json,
        } => {
            let keys = client
                .list_parked(&station, &group, partition)
                .await
                .context("listing parked keys")?;
            if json {
                return out_json(&json!(
                    keys.iter()
                        .map(|k| json!({
                            "partition": k.partition,
                            "key": key_text(&k.key),
                            "head_offset": k.head_offset,
                            "head": k.head.as_ref().map(|m| serde_json::from_str::<serde_json::Value>(&message_json(m)).unwrap_or_default()),
                        }))
                        .collect::<Vec<_>>()
                ));
            }
            let mut t = Table::new(["PARTITION", "KEY", "HEAD", "HEAD PAYLOAD"]);
            for k in &keys {
                t.row(vec![
                    k.partition.to_string(),
                    key_text(&k.key),
                    k.head_offset.to_string(),
                    k.head.as_ref().map_or_else(
                        || "?".into(),
                        |m| {
                            String::from_utf8_lossy(&m.payload)
                                .chars()
                                .take(60)
                                .collect()
                        },
                    ),
                ]);
            }
            out(&t.render())
        }
        GroupCommand::Skip {
            station,
            group,
            partition,
            key,
        } => {
            client
                .skip_parked(&station, &group, partition, &key.0)
                .await
                .context("skipping")?;
            out(&format!(
                "key {} skipped: its head goes to the dead-letter station",
                key_text(&key.0)
            ))
        }
        GroupCommand::Resume {
            station,
            group,
            partition,
            key,
            all: _,
        } => {
            let n = client
                .resume_parked(
                    &station,
                    &group,
                    partition,
                    key.as_ref().map(|k| k.0.as_slice()),
                )
                .await
                .context("resuming")?;
            out(&format!("{n} key(s) resumed"))
        }
        GroupCommand::Budget {
            station,
            group,
            max_lag_messages,
            max_lag_bytes,
            max_lag_age,
            partition,
        } => {
            let budget = LagBudget {
                max_messages: max_lag_messages,
                max_bytes: max_lag_bytes,
                max_age_ms: max_lag_age,
            };
            let parts = client
                .set_group_budget(&station, &group, partition, budget)
                .await
                .context("setting the budget")?;
            out(&isolation_text(&parts))
        }
        GroupCommand::Attach {
            station,
            group,
            partition,
        } => {
            let parts = client
                .reattach_group(&station, &group, partition)
                .await
                .context("attaching")?;
            out(&isolation_text(&parts))
        }
    }
}

pub(crate) async fn dls(args: DlsArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        DlsCommand::List {
            station,
            json,
            count,
        } => {
            let dls = format!("{station}{}", junction_types::groups::DEAD_LETTER_SUFFIX);
            let mut next = Start::Earliest;
            let mut left = count.unwrap_or(u64::MAX);
            let mut stdout = std::io::BufWriter::new(std::io::stdout());
            while left > 0 {
                let r = client
                    .read(&dls, 0, next, left.min(1000) as u32)
                    .await
                    .with_context(|| format!("reading {dls}"))?;
                if r.messages.is_empty() {
                    break;
                }
                for m in &r.messages {
                    if json {
                        writeln!(stdout, "{}", message_json(m))?;
                    } else {
                        let h = |k: &str| {
                            m.headers
                                .iter()
                                .find(|h| h.key == k)
                                .map(|h| String::from_utf8_lossy(&h.value).into_owned())
                                .unwrap_or_default()
                        };
                        writeln!(
                            stdout,
                            "#{} group={} from={}:{}@{} deliveries={} reason={} payload={}",
                            m.offset,
                            h("junction-dls-group"),
                            h("junction-dls-station"),
                            h("junction-dls-partition"),
                            h("junction-dls-offset"),
                            h("junction-dls-deliveries"),
                            h("junction-dls-reason"),
                            String::from_utf8_lossy(&m.payload)
                        )?;
                    }
                    left = left.saturating_sub(1);
                }
                next = Start::Offset(r.next_offset);
            }
            stdout.flush()?;
            Ok(())
        }
        DlsCommand::Resend {
            station,
            group,
            from,
            to,
        } => {
            let r = client
                .resend_dead_letters(
                    &station,
                    group.as_deref().unwrap_or(""),
                    from,
                    to.unwrap_or(0),
                )
                .await
                .context("resending dead letters")?;
            out(&format!(
                "resent {} dead letter(s) to {station}; next dead-letter offset {}",
                r.resent, r.next_offset
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{key_text, parse_key_bytes};

    #[test]
    fn keys_parse_as_text_or_hex_and_print_back() {
        assert_eq!(parse_key_bytes("order-7"), Ok(b"order-7".to_vec()));
        assert_eq!(parse_key_bytes("hex:00ff7a"), Ok(vec![0, 0xff, 0x7a]));
        assert_eq!(key_text(&[0, 0xff, 0x7a]), "hex:00ff7a");
        assert_eq!(key_text(b"order-7"), "order-7");
        for bad in ["hex:0", "hex:zz", "hex:é", "hex:aé0"] {
            assert!(parse_key_bytes(bad).is_err(), "{bad} is refused");
        }
    }
}
