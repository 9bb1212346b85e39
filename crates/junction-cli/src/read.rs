//! `junction read STATION`: print messages, optionally following new ones.

use std::io::Write;

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

/// Writes messages to stdout; remembers when the reader went away (`| head`).
struct Printer {
    json: bool,
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    closed: bool,
}

impl Printer {
    fn print(&mut self, m: &StoredMessage) -> anyhow::Result<()> {
        let result = if self.json {
            writeln!(self.out, "{}", message_json(m))
        } else {
            self.out
                .write_all(&m.payload)
                .and_then(|()| self.out.write_all(b"\n"))
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
    let mut printer = Printer {
        json: args.json,
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
                printer.print(m)?;
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
                    printer.print(&m)?;
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
