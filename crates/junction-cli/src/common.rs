//! What every client command shares: the `--server` option, table and JSON output.

use std::io::Write;

use anyhow::Context;
use junction_client::proto::{NodeInfo, PartitionInfo, StationInfo, StoredMessage};
use junction_client::{Client, ClientOptions};
use serde_json::{Value, json};

/// The addresses client commands use when neither `--server` nor `JUNCTION_SERVER` is set.
pub const DEFAULT_SERVERS: &str = "127.0.0.1:7701,127.0.0.1:7702,127.0.0.1:7703";

/// How to reach the cluster.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnArgs {
    /// Server addresses (host:port), comma-separated; any node of the cluster will do.
    #[arg(
        long = "server",
        env = "JUNCTION_SERVER",
        default_value = DEFAULT_SERVERS,
        value_name = "ADDR[,ADDR...]",
        global = true
    )]
    pub server: String,
    /// Credential for a cluster that runs with `--auth keys`: an API key (`jk_...`) or the
    /// admin token.
    #[arg(long, env = "JUNCTION_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Read the credential from this file when --token is not given (e.g. the dev
    /// cluster's `./data/admin.token`).
    #[arg(long, env = "JUNCTION_TOKEN_FILE", global = true, value_name = "PATH")]
    pub token_file: Option<std::path::PathBuf>,
    /// Speak TLS and trust the CA certificates of this PEM file (the dev cluster's is
    /// `./data/tls/ca.pem`, which `./scripts/junction` passes for you).
    #[arg(long, env = "JUNCTION_TLS_CA", global = true, value_name = "PEM")]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl ConnArgs {
    /// The addresses, split and trimmed.
    pub fn addresses(&self) -> Vec<String> {
        split_addresses(&self.server)
    }

    /// The credential, from `--token`, else `--token-file`.
    pub fn token(&self) -> anyhow::Result<Option<String>> {
        if self.token.is_some() {
            return Ok(self.token.clone());
        }
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?;
            return Ok(Some(text.trim().to_owned()));
        }
        Ok(self.token.clone())
    }

    /// Client options with the credential.
    pub fn options(&self) -> anyhow::Result<ClientOptions> {
        let options = ClientOptions {
            token: self.token()?,
            ..ClientOptions::default()
        };
        match &self.tls_ca {
            Some(ca) => Ok(options
                .with_tls_ca_file(ca)
                .with_context(|| format!("--tls-ca {}", ca.display()))?),
            None => Ok(options),
        }
    }

    /// A client for these addresses.
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::connect_with(self.addresses(), self.options()?)
            .with_context(|| format!("--server {:?}", self.server))
    }
}

pub(crate) fn split_addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Writes `text` to stdout; a closed pipe (`| head`) is not an error.
pub(crate) fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(()),
    }
}

/// Prints a JSON value on one line.
pub(crate) fn out_json(value: &Value) -> anyhow::Result<()> {
    out(&format!("{value}\n"))
}

/// Left-aligned columns separated by two spaces.
pub(crate) struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new<const N: usize>(headers: [&str; N]) -> Self {
        Self {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub(crate) fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut text = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[c].saturating_sub(cell.chars().count());
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad + 2));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

/// `1,2,3`, or `-` when empty.
pub(crate) fn id_list(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "-".to_owned();
    }
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

pub(crate) fn leader_cell(leader: Option<u64>) -> String {
    leader.map_or_else(|| "-".to_owned(), |id| id.to_string())
}

/// `tenant/name`.
pub(crate) fn full_name(station: &StationInfo) -> String {
    if station.tenant.is_empty() {
        station.name.clone()
    } else {
        format!("{}/{}", station.tenant, station.name)
    }
}

/// `2025-01-31 12:00:00 UTC` from milliseconds since the Unix epoch.
pub(crate) fn format_time_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn partition_json(p: &PartitionInfo) -> Value {
    json!({
        "partition": p.partition,
        "group_id": p.group_id,
        "leader": p.leader,
        "replicas": p.replicas,
        "start_offset": p.start_offset,
        "next_offset": p.next_offset,
        "messages": p.messages,
        "bytes": p.bytes,
        "data_lost_at_ms": p.data_lost_at_ms,
        "producers": p.producers,
        "dedup_ids": p.dedup_ids,
        "dedup_id_bytes": p.dedup_id_bytes,
    })
}

pub(crate) fn station_json(s: &StationInfo) -> Value {
    json!({
        "tenant": s.tenant,
        "name": s.name,
        "partitions": s.partitions,
        "replication_factor": s.replication_factor,
        "max_message_bytes": s.max_message_bytes,
        "created_at_ms": s.created_at_ms,
        "partition_info": s.partition_info.iter().map(partition_json).collect::<Vec<_>>(),
        "policy": crate::policy::policy_json(s),
        "schema": (!s.schema.is_empty()).then_some(&s.schema),
        "on_invalid": (!s.schema.is_empty()).then_some(&s.on_invalid),
    })
}

/// Polls the cluster status (every 500 ms) until `done` holds for it, for up to
/// `timeout_secs`; returns that status.
pub(crate) async fn wait_for_status(
    client: &Client,
    timeout_secs: u64,
    done: impl Fn(&junction_client::proto::ClusterStatusResponse) -> bool,
) -> anyhow::Result<junction_client::proto::ClusterStatusResponse> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
    let mut last_error = None;
    loop {
        match client.cluster_status().await {
            Ok(s) if done(&s) => return Ok(s),
            Ok(_) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(match last_error {
                Some(e) => anyhow::anyhow!("not done after {timeout_secs}s (last error: {e})"),
                None => anyhow::anyhow!("not done after {timeout_secs}s"),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

pub(crate) fn node_json(n: &NodeInfo) -> Value {
    json!({
        "id": n.id,
        "addr": n.addr,
        "alive": n.alive,
        "partition_replicas": n.partition_replicas,
        "partition_leaders": n.partition_leaders,
        "draining": n.draining,
    })
}

/// One message as a JSON line: `partition, offset, key, payload, timestamp_ms, headers`, with
/// `key_hex` / `payload_hex` / `headers_hex` for bytes that are not UTF-8.
pub(crate) fn message_json(m: &StoredMessage) -> String {
    let mut fields: Vec<(String, Value)> = vec![
        ("partition".into(), json!(m.partition)),
        ("offset".into(), json!(m.offset)),
    ];
    match m.key.as_deref() {
        None => fields.push(("key".into(), Value::Null)),
        Some(key) => fields.push(bytes_field("key", key)),
    }
    fields.push(bytes_field("payload", &m.payload));
    fields.push(("timestamp_ms".into(), json!(m.timestamp_ms)));
    let mut headers = serde_json::Map::new();
    let mut headers_hex = serde_json::Map::new();
    for h in &m.headers {
        match std::str::from_utf8(&h.value) {
            Ok(text) => headers.insert(h.key.clone(), json!(text)),
            Err(_) => headers_hex.insert(h.key.clone(), json!(hex(&h.value))),
        };
    }
    fields.push(("headers".into(), Value::Object(headers)));
    if !headers_hex.is_empty() {
        fields.push(("headers_hex".into(), Value::Object(headers_hex)));
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(name, value)| format!("{}:{value}", Value::String(name.clone())))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn bytes_field(name: &str, bytes: &[u8]) -> (String, Value) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (name.to_owned(), json!(text)),
        Err(_) => (format!("{name}_hex"), json!(hex(bytes))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use junction_client::proto::Header;

    #[test]
    fn tables_align() {
        let mut t = Table::new(["A", "LONG HEADER", "C"]);
        t.row(vec!["xxxx".into(), "1".into(), "z".into()]);
        assert_eq!(t.render(), "A     LONG HEADER  C\nxxxx  1            z\n");
    }

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_time_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time_ms(1_735_689_599_999), "2024-12-31 23:59:59 UTC");
    }

    #[test]
    fn messages_as_json_lines() {
        let m = StoredMessage {
            partition: 2,
            offset: 7,
            timestamp_ms: 5,
            key: Some(b"k".to_vec()),
            headers: vec![
                Header {
                    key: "a".into(),
                    value: b"b".to_vec(),
                },
                Header {
                    key: "bin".into(),
                    value: vec![0xff],
                },
            ],
            payload: bytes::Bytes::from_static(&[0xc3, 0x28]),
        };
        assert_eq!(
            message_json(&m),
            r#"{"partition":2,"offset":7,"key":"k","payload_hex":"c328","timestamp_ms":5,"headers":{"a":"b"},"headers_hex":{"bin":"ff"}}"#
        );
        let parsed: Value = serde_json::from_str(&message_json(&m)).unwrap();
        assert_eq!(parsed["offset"], 7);
    }

    #[test]
    fn addresses_split() {
        assert_eq!(split_addresses(" a:1, b:2 ,,"), vec!["a:1", "b:2"]);
    }
}
