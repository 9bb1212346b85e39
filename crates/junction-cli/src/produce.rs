//! `junction produce STATION`: one message per stdin line.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::FutureExt;
use junction_client::proto::{Header, Message};
use junction_client::{ClientError, ProducerOptions, SendFuture};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use crate::common::{ConnArgs, out};

/// Most messages awaiting acknowledgement before reading more input.
const WINDOW: usize = 20_000;

/// Send one message per line of standard input (without the newline).
#[derive(clap::Args, Debug)]
pub struct ProduceArgs {
    /// The station (NAME or TENANT/NAME).
    pub station: String,
    /// The key of every message.
    #[arg(long, conflicts_with = "key_sep")]
    pub key: Option<String>,
    /// Split each line at the first SEP into key and payload (`TAB` or `\t` for a tab); lines
    /// without SEP have no key.
    #[arg(long, value_name = "SEP")]
    pub key_sep: Option<String>,
    /// Send every message to this partition instead of choosing by key.
    #[arg(long)]
    pub partition: Option<u32>,
    /// A header on every message; repeatable.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Give each message the message id PREFIX/N (its `junction-msg-id` header; N is its line
    /// number from 1): on a station with a dedup window, running the same command on the same
    /// input again stores nothing twice.
    #[arg(long, value_name = "PREFIX")]
    pub msg_id_header: Option<String>,
    /// Send as an idempotent producer (the default): a batch retried after a lost reply is
    /// stored once.
    #[arg(long, overrides_with = "no_idempotent")]
    pub idempotent: bool,
    /// Send without producer sequence numbers: a retry after a lost reply may store a batch
    /// twice.
    #[arg(long, overrides_with = "idempotent")]
    pub no_idempotent: bool,
    /// Produce as the named producer NAME (per tenant): starting another `produce` with the
    /// same name fences this one.
    #[arg(long, value_name = "NAME", conflicts_with = "no_idempotent")]
    pub producer_name: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {s:?}")),
    }
}

/// `TAB`, `\t` and `SPACE` name their characters; anything else is taken literally.
pub(crate) fn parse_separator(s: &str) -> anyhow::Result<Vec<u8>> {
    let sep = match s {
        "TAB" | "tab" | "\\t" => "\t",
        "SPACE" | "space" => " ",
        "" => bail!("--key-sep must not be empty"),
        other => other,
    };
    Ok(sep.as_bytes().to_vec())
}

/// How a line becomes a message.
pub(crate) struct LineFormat {
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) key_sep: Option<Vec<u8>>,
    pub(crate) partition: Option<u32>,
    pub(crate) headers: Vec<Header>,
    /// Message ids are `PREFIX/N`.
    pub(crate) msg_id_prefix: Option<String>,
}

impl LineFormat {
    /// The message of line `n` (counted from 1).
    pub(crate) fn message(&self, n: u64, line: &[u8]) -> Message {
        let (key, payload) = match &self.key_sep {
            Some(sep) => match find(line, sep) {
                Some(at) => (Some(line[..at].to_vec()), &line[at + sep.len()..]),
                None => (None, line),
            },
            None => (self.key.clone(), line),
        };
        Message {
            key,
            headers: self.headers.clone(),
            payload: Bytes::copy_from_slice(payload),
            partition: self.partition,
            msg_id: self.msg_id_prefix.as_ref().map(|p| format!("{p}/{n}")),
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Strips the line ending (`\n` or `\r\n`).
pub(crate) fn trim_newline(mut line: &[u8]) -> &[u8] {
    if let Some(rest) = line.strip_suffix(b"\n") {
        line = rest;
        if let Some(rest) = line.strip_suffix(b"\r") {
            line = rest;
        }
    }
    line
}

#[derive(Default)]
struct Tally {
    acknowledged: u64,
    failed: u64,
    first_error: Option<ClientError>,
}

impl Tally {
    fn settle(&mut self, result: Result<junction_client::MessagePosition, ClientError>) {
        match result {
            Ok(_) => self.acknowledged += 1,
            Err(err) => {
                self.failed += 1;
                self.first_error.get_or_insert(err);
            }
        }
    }
}

pub(crate) async fn run(args: ProduceArgs) -> anyhow::Result<()> {
    let acknowledged = run_from(args, BufReader::new(tokio::io::stdin())).await?;
    out(&format!("acknowledged {acknowledged} messages\n"))
}

/// Sends one message per line of `input`; returns how many were acknowledged, or an error
/// (after printing the count) if any failed.
pub(crate) async fn run_from(
    args: ProduceArgs,
    mut input: impl AsyncBufRead + Unpin,
) -> anyhow::Result<u64> {
    let client = args.conn.client()?;
    let format = LineFormat {
        key: args.key.map(String::into_bytes),
        key_sep: args.key_sep.as_deref().map(parse_separator).transpose()?,
        partition: args.partition,
        headers: args
            .headers
            .into_iter()
            .map(|(key, value)| Header {
                key,
                value: value.into_bytes(),
            })
            .collect(),
        msg_id_prefix: args.msg_id_header,
    };
    let options = ProducerOptions {
        idempotent: !args.no_idempotent,
        ..ProducerOptions::default()
    };
    let producer = match &args.producer_name {
        Some(name) => client.named_producer(&args.station, name, options),
        None => client.producer(&args.station, options),
    };
    let mut line_no = 0u64;
    let progress = std::io::stderr().is_terminal();
    let mut last_progress = Instant::now();
    let mut tally = Tally::default();
    let mut pending: VecDeque<SendFuture> = VecDeque::new();
    let mut line = Vec::new();
    let mut stopped_early = false;
    loop {
        line.clear();
        let read = input
            .read_until(b'\n', &mut line)
            .await
            .context("reading standard input")?;
        if read == 0 {
            break;
        }
        line_no += 1;
        pending.push_back(producer.send(format.message(line_no, trim_newline(&line))));
        // Settle what is already acknowledged, and wait when the window is full.
        loop {
            let full = pending.len() >= WINDOW;
            let Some(front) = pending.front_mut() else {
                break;
            };
            let result = if full {
                Some(front.await)
            } else {
                front.now_or_never()
            };
            let Some(result) = result else { break };
            pending.pop_front();
            tally.settle(result);
        }
        if tally.failed > 0 {
            stopped_early = true;
            break;
        }
        if progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprint!("\racknowledged {} messages", tally.acknowledged);
        }
    }
    for future in pending {
        tally.settle(future.await);
    }
    producer.close().await;
    if progress && tally.acknowledged > 0 {
        eprint!("\r");
    }
    if let Some(err) = tally.first_error {
        out(&format!("acknowledged {} messages\n", tally.acknowledged))?;
        let stopped = if stopped_early {
            " (stopped reading input)"
        } else {
            ""
        };
        bail!(
            "{} of {} messages failed{stopped}; first error: {err}",
            tally.failed,
            tally.failed + tally.acknowledged
        );
    }
    Ok(tally.acknowledged)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn format(key: Option<&str>, sep: Option<&str>) -> LineFormat {
        LineFormat {
            key: key.map(|k| k.as_bytes().to_vec()),
            key_sep: sep.map(|s| parse_separator(s).unwrap()),
            partition: None,
            headers: vec![],
            msg_id_prefix: None,
        }
    }

    #[test]
    fn separators() {
        assert_eq!(parse_separator("TAB").unwrap(), b"\t");
        assert_eq!(parse_separator("\\t").unwrap(), b"\t");
        assert_eq!(parse_separator("::").unwrap(), b"::");
        assert!(parse_separator("").is_err());
    }

    #[test]
    fn lines_become_messages() {
        let m = format(None, Some("TAB")).message(1, b"user1\thello\tworld");
        assert_eq!(m.key.as_deref(), Some(&b"user1"[..]));
        assert_eq!(&m.payload[..], b"hello\tworld");
        let m = format(None, Some("::")).message(2, b"no separator");
        assert_eq!(m.key, None);
        assert_eq!(&m.payload[..], b"no separator");
        let m = format(Some("k"), None).message(3, b"x");
        assert_eq!(m.key.as_deref(), Some(&b"k"[..]));
        let m = format(None, None).message(4, b"");
        assert!(m.payload.is_empty());
        assert_eq!(m.msg_id, None);
        let mut with_ids = format(None, None);
        with_ids.msg_id_prefix = Some("run-7".into());
        assert_eq!(
            with_ids.message(12, b"x").msg_id.as_deref(),
            Some("run-7/12")
        );
    }

    #[test]
    fn newlines_are_trimmed() {
        assert_eq!(trim_newline(b"a\r\n"), b"a");
        assert_eq!(trim_newline(b"a\n"), b"a");
        assert_eq!(trim_newline(b"a"), b"a");
        assert_eq!(trim_newline(b"a\r"), b"a\r");
    }

    #[test]
    fn headers_parse() {
        assert_eq!(parse_header("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_header("=x").is_err());
        assert!(parse_header("x").is_err());
    }
}
