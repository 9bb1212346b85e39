//! A fault-injecting TCP proxy, one per directed node-to-node link, on loopback. No root, no
//! iptables: each node is told (with `--dial-overrides`) to reach peer `j` through the proxy
//! of its link `i → j`, which forwards to `j`'s real port unless told otherwise.
//!
//! Link modes and how they emulate the network:
//! - `Up`: bytes are forwarded as they come.
//! - `Blocked(Reset)`: existing connections are reset (RST), new ones are accepted and reset at
//!   once — like a peer whose host answers with RST / ICMP unreachable.
//! - `Blocked(Blackhole)`: nothing is forwarded, in either direction, but connections stay
//!   open and new ones are accepted and held — like dropped packets. Bytes sent meanwhile are
//!   delivered when the link heals, as TCP retransmission would deliver them.
//! - `Delay`: each chunk read from one side is written to the other `delay + U(0, jitter)` ms
//!   after it arrived, in order.
//! - `Lossy`: TCP cannot lose bytes without breaking the stream, so loss is emulated by its
//!   visible effects: with probability `stall_per_mille`‰ a chunk (and everything behind it) is
//!   held back `stall_ms` ms, as a retransmission timeout would; with probability
//!   `reset_per_10k` in 10,000 the connection is reset, as when loss outlasts the retries.
//!
//! Because one proxy carries one direction of the node pair (`i` dialling `j`), blocking
//! `i → j` only breaks the connections `i` opens to `j`; a partition blocks both links.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::schedule::{SplitMix64, derive_seed};

/// How a blocked link refuses traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockMode {
    /// Connections are reset.
    Reset,
    /// Traffic silently stops (and resumes when healed).
    Blackhole,
}

impl fmt::Display for BlockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockMode::Reset => "reset",
            BlockMode::Blackhole => "blackhole",
        })
    }
}

/// The state of one directed link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum LinkMode {
    Up,
    Blocked {
        how: BlockMode,
    },
    Delay {
        delay_ms: u32,
        jitter_ms: u32,
    },
    Lossy {
        stall_per_mille: u32,
        stall_ms: u32,
        reset_per_10k: u32,
    },
}

impl LinkMode {
    fn is_blackhole(&self) -> bool {
        matches!(
            self,
            LinkMode::Blocked {
                how: BlockMode::Blackhole
            }
        )
    }
}

/// Counters of one link, for the report.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
pub struct LinkStats {
    pub connections: u64,
    pub bytes: u64,
    pub resets: u64,
}

struct Link {
    target: SocketAddr,
    mode: watch::Sender<LinkMode>,
    /// Bumped to reset every open connection.
    epoch: watch::Sender<u64>,
    seed: u64,
    connections: AtomicU64,
    bytes: AtomicU64,
    resets: AtomicU64,
}

/// A running proxy: listens on loopback and forwards to `target` according to its mode.
/// Dropping it stops the listener and every connection.
pub struct Proxy {
    addr: SocketAddr,
    link: Arc<Link>,
    task: JoinHandle<()>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("target", &self.link.target)
            .field("mode", &self.mode())
            .finish()
    }
}

impl Proxy {
    /// Binds `127.0.0.1:0` and starts forwarding to `target`.
    pub async fn start(target: SocketAddr, seed: u64) -> io::Result<Proxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(LinkMode::Up);
        let (epoch, _) = watch::channel(0u64);
        let link = Arc::new(Link {
            target,
            mode,
            epoch,
            seed,
            connections: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            resets: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(listener, link.clone()));
        Ok(Proxy { addr, link, task })
    }

    /// The address nodes dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn mode(&self) -> LinkMode {
        *self.link.mode.borrow()
    }

    /// Switches the link's mode. Entering `Blocked { how: Reset }` resets open connections.
    pub fn set_mode(&self, mode: LinkMode) {
        self.link.mode.send_replace(mode);
        if mode
            == (LinkMode::Blocked {
                how: BlockMode::Reset,
            })
        {
            self.link.epoch.send_modify(|e| *e += 1);
        }
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats {
            connections: self.link.connections.load(Ordering::Relaxed),
            bytes: self.link.bytes.load(Ordering::Relaxed),
            resets: self.link.resets.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, link: Arc<Link>) {
    // Owning the connection tasks here means aborting this task ends them all.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    let n = link.connections.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(serve_conn(sock, link.clone(), n));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn reset(sock: &TcpStream) {
    let _ignored = sock.set_zero_linger();
}

async fn serve_conn(mut client: TcpStream, link: Arc<Link>, n: u64) {
    let _ignored = client.set_nodelay(true);
    let mut mode = link.mode.subscribe();
    // A blackholed link holds new connections until it heals (or turns into a reset).
    let Ok(current) = mode.wait_for(|m| !m.is_blackhole()).await.map(|m| *m) else {
        return;
    };
    if let LinkMode::Blocked { .. } = current {
        link.resets.fetch_add(1, Ordering::Relaxed);
        reset(&client);
        return;
    }
    let connect = TcpStream::connect(link.target);
    let mut upstream = match tokio::time::timeout(Duration::from_secs(1), connect).await {
        Ok(Ok(s)) => s,
        _ => {
            reset(&client);
            return;
        }
    };
    let _ignored = upstream.set_nodelay(true);
    let mut epoch = link.epoch.subscribe();
    let outcome = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let up = pump(cr, uw, &link, derive_seed(link.seed, 2 * n));
        let down = pump(ur, cw, &link, derive_seed(link.seed, 2 * n + 1));
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
            _ = epoch.changed() => Err(io::Error::new(io::ErrorKind::ConnectionReset, "link blocked")),
        }
    };
    if outcome.is_err() {
        link.resets.fetch_add(1, Ordering::Relaxed);
        reset(&client);
        reset(&upstream);
    }
}

/// Forwards one direction: a reader queues chunks with the time each may be delivered, a
/// writer delivers them in order, waiting out blackholes and delays.
async fn pump(mut r: ReadHalf<'_>, mut w: WriteHalf<'_>, link: &Link, seed: u64) -> io::Result<()> {
    // Deep enough that a delayed link never limits how many chunks are in flight (which
    // would turn latency into a bandwidth cap); HTTP/2 flow control bounds the bytes.
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(1 << 14);
    let read_side = async move {
        let mut rng = SplitMix64::new(seed);
        let mut buf = vec![0u8; 32 * 1024];
        let mut last_due = Instant::now();
        let mut mode = link.mode.subscribe();
        loop {
            // A blackholed link stops reading too, so the sender's buffers fill up.
            if mode.wait_for(|m| !m.is_blackhole()).await.is_err() {
                return Err(io::Error::other("proxy stopped"));
            }
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<(), io::Error>(());
            }
            let chunk = buf.get(..n).map(<[u8]>::to_vec).unwrap_or_default();
            let extra_ms = match *link.mode.borrow() {
                LinkMode::Delay {
                    delay_ms,
                    jitter_ms,
                } => u64::from(delay_ms) + rng.below(u64::from(jitter_ms) + 1),
                LinkMode::Lossy {
                    stall_per_mille,
                    stall_ms,
                    reset_per_10k,
                } => {
                    if rng.below(10_000) < u64::from(reset_per_10k) {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "emulated loss",
                        ));
                    }
                    if rng.below(1000) < u64::from(stall_per_mille) {
                        u64::from(stall_ms)
                    } else {
                        0
                    }
                }
                LinkMode::Up | LinkMode::Blocked { .. } => 0,
            };
            let due = (Instant::now() + Duration::from_millis(extra_ms)).max(last_due);
            last_due = due;
            if tx.send((due, chunk)).await.is_err() {
                return Ok(());
            }
        }
    };
    let write_side = async move {
        let mut mode = link.mode.subscribe();
        while let Some((due, chunk)) = rx.recv().await {
            if mode.wait_for(|m| !m.is_blackhole()).await.is_err() {
                return Err(io::Error::other("proxy stopped"));
            }
            tokio::time::sleep_until(due).await;
            w.write_all(&chunk).await?;
            link.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        w.shutdown().await
    };
    tokio::try_join!(read_side, write_side).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> io::Result<Vec<u8>> {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    #[tokio::test]
    async fn forwards_when_up() {
        let p = Proxy::start(echo().await, 1).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"hello").await.unwrap(), b"hello");
        assert_eq!(p.stats().bytes, 10);
    }

    #[tokio::test]
    async fn reset_block_breaks_open_and_new_connections_and_heals() {
        let p = Proxy::start(echo().await, 2).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        roundtrip(&mut s, b"x").await.unwrap();
        p.set_mode(LinkMode::Blocked {
            how: BlockMode::Reset,
        });
        let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut s, b"y")).await;
        assert!(matches!(r, Ok(Err(_))), "{r:?}");
        let mut s2 = TcpStream::connect(p.addr()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut s2, b"z")).await;
        assert!(matches!(r, Ok(Err(_))), "{r:?}");
        p.set_mode(LinkMode::Up);
        let mut s3 = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(roundtrip(&mut s3, b"ok").await.unwrap(), b"ok");
    }

    #[tokio::test]
    async fn blackhole_holds_bytes_until_healed() {
        let p = Proxy::start(echo().await, 3).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        roundtrip(&mut s, b"a").await.unwrap();
        p.set_mode(LinkMode::Blocked {
            how: BlockMode::Blackhole,
        });
        s.write_all(b"b").await.unwrap();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_millis(300), s.read_exact(&mut buf)).await;
        assert!(r.is_err(), "nothing must come back while blackholed");
        // A connection opened meanwhile is held, not refused.
        let mut s2 = TcpStream::connect(p.addr()).await.unwrap();
        s2.write_all(b"c").await.unwrap();
        p.set_mode(LinkMode::Up);
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"b");
        tokio::time::timeout(Duration::from_secs(5), s2.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"c");
    }

    #[tokio::test]
    async fn delay_adds_latency_and_keeps_order() {
        let p = Proxy::start(echo().await, 4).await.unwrap();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        p.set_mode(LinkMode::Delay {
            delay_ms: 100,
            jitter_ms: 50,
        });
        let started = std::time::Instant::now();
        let mut expected = Vec::new();
        for i in 0..20u8 {
            s.write_all(&[i]).await.unwrap();
            expected.push(i);
        }
        let mut got = vec![0u8; 20];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        // Each direction adds at least 100 ms.
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[tokio::test]
    async fn lossy_link_eventually_resets_a_busy_connection() {
        let p = Proxy::start(echo().await, 5).await.unwrap();
        p.set_mode(LinkMode::Lossy {
            stall_per_mille: 0,
            stall_ms: 0,
            reset_per_10k: 5000,
        });
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let mut broke = false;
        for _ in 0..50 {
            match tokio::time::timeout(Duration::from_secs(5), roundtrip(&mut s, b"p")).await {
                Ok(Ok(_)) => {}
                _ => {
                    broke = true;
                    break;
                }
            }
        }
        assert!(broke);
        assert!(p.stats().resets >= 1);
    }
}
