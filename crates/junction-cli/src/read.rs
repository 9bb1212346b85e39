//! `junction read STATION`: print messages, optionally following new ones.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use futures::{FutureExt, StreamExt};
use junction_client::proto::StoredMessage;
use junction_client::{Client, Start};

use crate::common::{ConnArgs, message_json};

/// Most messages asked for in one Read call.
const READ_CHUNK: u64 = 1000;

/// Print the messages of a station.
#[derive(clap::Args, Debug)]
pub struct ReadArgs {
    /// The station (NAME or TENANT/NAME).
    pub station: String,
    /// Only this partition [default: every partition, one after the other].
    #[arg(long)]
    pub partition: Option<u32>,
    /// Where to start: `earliest`, `latest`, an offset, or `@MS` for the first message at or
    /// after MS milliseconds since the Unix epoch.
    #[arg(long, default_value = "earliest", value_parser = parse_start)]
    pub from: Start,
    /// Stop after this many messages (across partitions).
    #[arg(long)]
    pub count: Option<u64>,
    /// Keep waiting for new messages (until --count or Ctrl-C).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// One JSON object per line: partition, offset, key, payload, timestamp_ms, headers.
    #[arg(long)]
    pub json: bool,
    /// Decode payloads with the schema version named in their `junction-schema` header
    /// (fetched from the registry) and print them as JSON: Protobuf in its JSON mapping,
    /// Avro as JSON values. With --json the decoded value is the `decoded` field. A message
    /// without the header, or one that does not decode, is printed as stored (with a
    /// `decode_error` field under --json, a note on stderr otherwise).
    #[arg(long)]
    pub decode: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

pub(crate) fn parse_start(s: &str) -> Result<Start, String> {
    match s {
        "earliest" | "beginning" => Ok(Start::Earliest),
        "latest" | "end" => Ok(Start::Latest),
        _ => {
            if let Some(ms) = s.strip_prefix('@') {
                ms.parse()
                    .map(Start::Timestamp)
                    .map_err(|_| format!("expected @MILLISECONDS, got {s:?}"))
            } else {
                s.parse()
                    .map(Start::Offset)
                    .map_err(|_| format!("expected earliest, latest, an offset or @MS, got {s:?}"))
            }
        }
    }
}

/// Decodes payloads with the registry's schemas, each version fetched and compiled once.
struct Decoder {
    client: Client,
    /// The tenant of the station (empty: the caller's own).
    tenant: String,
    /// `name@version` → the compiled schema, or why there is none.
    schemas: HashMap<String, Result<Arc<junction_schema::Schema>, String>>,
}

impl Decoder {
    /// Returns the payload as JSON, `None` for a message without a schema header, or why it
    /// could not be decoded.
    async fn decode(&mut self, m: &StoredMessage) -> Option<Result<serde_json::Value, String>> {
        let label = m
            .headers
            .iter()
            .find(|h| h.key == junction_types::schema::SCHEMA_HEADER)
            .map(|h| String::from_utf8_lossy(&h.value).into_owned())?;
        if !self.schemas.contains_key(&label) {
            let compiled = self.fetch(&label).await;
            self.schemas.insert(label.clone(), compiled);
        }
        let schema = match self.schemas.get(&label) {
            Some(Ok(s)) => s.clone(),
            Some(Err(e)) => return Some(Err(e.clone())),
            None => return Some(Err(format!("schema {label} was not fetched"))),
        };
        Some(
            schema
                .to_json(&m.payload)
                .map_err(|e| format!("does not decode with {label}: {e}")),
        )
    }

    /// Fetches and compiles `name@version`.
    async fn fetch(&self, label: &str) -> Result<Arc<junction_schema::Schema>, String> {
        let (name, version) = label
            .rsplit_once('@')
            .and_then(|(n, v)| Some((n, v.parse::<u32>().ok()?)))
            .ok_or_else(|| format!("the schema header {label:?} is not NAME@VERSION"))?;
        let info = self
            .client
            .get_schema(&self.tenant, name)
            .await
            .map_err(|e| format!("fetching schema {label}: {e}"))?;
        let v = info
            .versions
            .iter()
            .find(|v| v.version == version)
            .ok_or_else(|| format!("schema {name} has no version {version} any more"))?;
        let kind: junction_types::schema::SchemaType = info
            .r#type
            .parse()
            .map_err(|e| format!("schema {label}: {e}"))?;
        junction_schema::Schema::compile(
            kind,
            &v.text,
            v.message.as_deref(),
            junction_schema::Limits::default(),
        )
        .map(Arc::new)
        .map_err(|e| format!("schema {label} does not compile here: {e}"))
    }
}

/// Writes messages to stdout; remembers when the reader went away (`| head`).
struct Printer {
    json: bool,
    decoder: Option<Decoder>,
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    closed: bool,
}

impl Printer {
    async fn print(&mut self, m: &StoredMessage) -> anyhow::Result<()> {
        let decoded = match &mut self.decoder {
            Some(d) => d.decode(m).await,
            None => None,
        };
        let result = match (self.json, decoded) {
            (true, None) => writeln!(self.out, "{}", message_json(m)),
            (true, Some(d)) => {
                let extra = match d {
                    Ok(v) => format!("\"decoded\":{v}"),
                    Err(e) => format!("\"decode_error\":{}", serde_json::Value::String(e)),
                };
                let plain = message_json(m);
                // `message_json` writes one object: add the field before its closing brace.
                let body = plain.strip_suffix('}').unwrap_or(&plain);
                writeln!(self.out, "{body},{extra}}}")
            }
            (false, Some(Ok(v))) => writeln!(self.out, "{v}"),
            (false, decoded) => {
                if let Some(Err(e)) = decoded {
                    eprintln!("partition {} offset {}: {e}", m.partition, m.offset);
                }
                self.out
                    .write_all(&m.payload)
                    .and_then(|()| self.out.write_all(b"\n"))
            }
        };
        self.check(result)
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        let result = self.out.flush();
        self.check(result)
    }

    fn check(&mut self, result: std::io::Result<()>) -> anyhow::Result<()> {
        match result {
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            other => Ok(other?),
        }
    }
}

pub(crate) async fn run(args: ReadArgs) -> anyhow::Result<()> {
    run_to(args, Box::new(std::io::stdout())).await
}

/// Like [`run`], writing to `output`.
pub(crate) async fn run_to(args: ReadArgs, output: Box<dyn Write + Send>) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    let partitions: Vec<u32> = match args.partition {
        Some(p) => vec![p],
        None => {
            let station = client
                .describe_station(&args.station)
                .await
                .with_context(|| format!("describing station {}", args.station))?;
            (0..station.partitions).collect()
        }
    };
    let decoder = args.decode.then(|| Decoder {
        client: client.clone(),
        tenant: args
            .station
            .split_once('/')
            .map(|(t, _)| t.to_owned())
            .unwrap_or_default(),
        schemas: HashMap::new(),
    });
    let mut printer = Printer {
        json: args.json,
        decoder,
        out: std::io::BufWriter::new(output),
        closed: false,
    };
    if args.count == Some(0) {
        return Ok(());
    }
    if args.follow {
        follow(&client, &args, &partitions, &mut printer).await
    } else {
        read_to_end(&client, &args, &partitions, &mut printer).await
    }
}

/// Reads each partition up to its high watermark (or until --count).
async fn read_to_end(
    client: &Client,
    args: &ReadArgs,
    partitions: &[u32],
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let mut remaining = args.count.unwrap_or(u64::MAX);
    for &partition in partitions {
        let mut start = args.from;
        loop {
            let max = remaining.min(READ_CHUNK) as u32;
            let resp = client
                .read(&args.station, partition, start, max)
                .await
                .with_context(|| format!("reading {} partition {partition}", args.station))?;
            for m in resp.messages.iter().take(remaining as usize) {
                printer.print(m).await?;
                remaining -= 1;
            }
            printer.flush()?;
            if remaining == 0 || printer.closed {
                return Ok(());
            }
            if resp.messages.is_empty() || resp.next_offset >= resp.high_watermark {
                break;
            }
            start = Start::Offset(resp.next_offset);
        }
    }
    Ok(())
}

/// Tails every partition until --count or Ctrl-C.
async fn follow(
    client: &Client,
    args: &ReadArgs,
    partitions: &[u32],
    printer: &mut Printer,
) -> anyhow::Result<()> {
    let mut remaining = args.count.unwrap_or(u64::MAX);
    let tails = partitions
        .iter()
        .map(|&p| client.tail(&args.station, p, args.from));
    let mut merged = futures::stream::select_all(tails);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let mut item = tokio::select! {
            _ = &mut ctrl_c => return printer.flush(),
            item = merged.next() => item,
        };
        // Print everything already received, then flush once.
        loop {
            match item {
                None => return printer.flush(),
                Some(Err(err)) => {
                    printer.flush()?;
                    return Err(err).with_context(|| format!("following {}", args.station));
                }
                Some(Ok(m)) => {
                    printer.print(&m).await?;
                    remaining -= 1;
                    if remaining == 0 || printer.closed {
                        return printer.flush();
                    }
                }
            }
            match merged.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
        printer.flush()?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn starts_parse() {
        assert_eq!(parse_start("earliest").unwrap(), Start::Earliest);
        assert_eq!(parse_start("latest").unwrap(), Start::Latest);
        assert_eq!(parse_start("42").unwrap(), Start::Offset(42));
        assert_eq!(
            parse_start("@1700000000000").unwrap(),
            Start::Timestamp(1_700_000_000_000)
        );
        assert!(parse_start("-1").is_err());
        assert!(parse_start("soon").is_err());
    }
}
