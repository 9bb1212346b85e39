//! `junction tenant ...`

use anyhow::Context;

use junction_client::proto::{QuotaLimits, TenantQuota};

use crate::common::{ConnArgs, out, out_json};

/// Create and list tenants.
#[derive(clap::Args, Debug)]
pub struct TenantArgs {
    #[command(subcommand)]
    pub command: TenantCommand,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum TenantCommand {
    /// Create a tenant.
    Create { name: String },
    /// List tenants.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or change a tenant's quotas.
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum QuotaCommand {
    /// Set or clear limits of a tenant, or of one of its stations (cluster admins only).
    /// Rates are per second for the whole cluster; sizes accept K, M, G (powers of 1024).
    ///
    /// Example: junction tenant quota set acme --produce-bytes-per-sec 10M --stations 20
    Set {
        tenant: String,
        /// One station's own limits (they narrow the tenant's for that station).
        #[arg(long)]
        station: Option<String>,
        #[arg(long, value_parser = parse_size)]
        produce_bytes_per_sec: Option<u64>,
        #[arg(long, value_parser = parse_size)]
        produce_messages_per_sec: Option<u64>,
        #[arg(long, value_parser = parse_size)]
        consume_bytes_per_sec: Option<u64>,
        /// Message bytes the tenant's stations may hold (produces are refused beyond it).
        #[arg(long, value_parser = parse_size)]
        stored_bytes: Option<u64>,
        #[arg(long)]
        stations: Option<u64>,
        #[arg(long)]
        groups: Option<u64>,
        /// Open streams (produce streams, tails, consume sessions) per node.
        #[arg(long)]
        streams: Option<u64>,
        /// Remove a limit (repeatable): produce-bytes-per-sec, produce-messages-per-sec,
        /// consume-bytes-per-sec, stored-bytes, stations, groups, streams.
        #[arg(long)]
        clear: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a tenant's limits and what it uses (your own tenant when none is given).
    Get {
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `1000`, `64K`, `10M`, `2G` (K, M, G are powers of 1024).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1u64 << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a number (examples: 1000, 64K, 10M, 2G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("'{s}' is too large"))
}

pub(crate) async fn run(args: TenantArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        TenantCommand::Create { name } => {
            client
                .create_tenant(&name)
                .await
                .with_context(|| format!("creating tenant {name}"))?;
            out(&format!("created tenant {name}\n"))
        }
        TenantCommand::List { json } => {
            let tenants = client.list_tenants().await.context("listing tenants")?;
            if json {
                return out_json(&serde_json::json!(tenants));
            }
            let mut text = String::new();
            for tenant in tenants {
                text.push_str(&tenant);
                text.push('\n');
            }
            out(&text)
        }
        TenantCommand::Quota {
            command:
                QuotaCommand::Set {
                    tenant,
                    station,
                    produce_bytes_per_sec,
                    produce_messages_per_sec,
                    consume_bytes_per_sec,
                    stored_bytes,
                    stations,
                    groups,
                    streams,
                    clear,
                    json,
                },
        } => {
            let set = QuotaLimits {
                produce_bytes_per_sec,
                produce_messages_per_sec,
                consume_bytes_per_sec,
                stored_bytes,
                stations,
                groups,
                streams,
            };
            let q = client
                .set_quota(&tenant, station.as_deref(), set, clear)
                .await
                .with_context(|| format!("setting the quota of tenant {tenant}"))?;
            print_quota(&q, json)
        }
        TenantCommand::Quota {
            command: QuotaCommand::Get { tenant, json },
        } => {
            let name = tenant.unwrap_or_default();
            let q = client
                .get_quota(&name)
                .await
                .with_context(|| format!("reading the quota of tenant {name}"))?;
            print_quota(&q, json)
        }
    }
}

fn limits_rows(l: &QuotaLimits) -> [(&'static str, Option<u64>); 7] {
    [
        ("produce-bytes-per-sec", l.produce_bytes_per_sec),
        ("produce-messages-per-sec", l.produce_messages_per_sec),
        ("consume-bytes-per-sec", l.consume_bytes_per_sec),
        ("stored-bytes", l.stored_bytes),
        ("stations", l.stations),
        ("groups", l.groups),
        ("streams", l.streams),
    ]
}

fn limits_json(l: &QuotaLimits) -> serde_json::Value {
    serde_json::Value::Object(
        limits_rows(l)
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), serde_json::json!(v))))
            .collect(),
    )
}

fn print_quota(q: &TenantQuota, json: bool) -> anyhow::Result<()> {
    let none = QuotaLimits::default();
    let limits = q.limits.as_ref().unwrap_or(&none);
    if json {
        let stations: serde_json::Map<String, serde_json::Value> = q
            .stations
            .iter()
            .map(|s| {
                (
                    s.station.clone(),
                    serde_json::json!({
                        "limits": limits_json(s.limits.as_ref().unwrap_or(&none)),
                        "stored_bytes": s.stored_bytes,
                    }),
                )
            })
            .collect();
        return out_json(&serde_json::json!({
            "tenant": q.tenant,
            "limits": limits_json(limits),
            "stations": stations,
            "used": {
                "stations": q.stations_used,
                "groups": q.groups_used,
                "stored_bytes": q.stored_bytes,
                "streams_open_on_this_node": q.streams_open,
            },
        }));
    }
    let used = |k: &str| match k {
        "stored-bytes" => Some(q.stored_bytes),
        "stations" => Some(q.stations_used),
        "groups" => Some(q.groups_used),
        "streams" => Some(q.streams_open),
        _ => None,
    };
    let mut text = format!("tenant {}\n", q.tenant);
    text.push_str(&format!(
        "  {:<26} {:>16} {:>16}\n",
        "QUOTA", "LIMIT", "USED"
    ));
    for (k, v) in limits_rows(limits) {
        let limit = v.map_or_else(|| "-".to_string(), |v| v.to_string());
        let used = used(k).map_or_else(|| "".to_string(), |u| u.to_string());
        text.push_str(&format!("  {k:<26} {limit:>16} {used:>16}\n"));
    }
    for s in &q.stations {
        text.push_str(&format!(
            "station {} (stores {} bytes)\n",
            s.station, s.stored_bytes
        ));
        for (k, v) in limits_rows(s.limits.as_ref().unwrap_or(&none)) {
            if let Some(v) = v {
                text.push_str(&format!("  {k:<26} {v:>16}\n"));
            }
        }
    }
    text.push_str("(streams: open on the node that answered; rates are not shown as used)\n");
    out(&text)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_nonsense() {
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
