//! Helpers for programs that start Junction nodes as child processes on 127.0.0.1: the
//! integration tests, `junction chaos` and `junction bench --spawn`.
//!
//! [`loopback_ports`] is the one that matters. A child process must be told its port before it
//! binds it, so the parent picks a port that is free *now* and hopes it stays free. Picking it by
//! binding port 0 is a race that loses: the kernel hands out port-0 binds and the source ports
//! of outgoing connections from the same ephemeral range, so by the time the child binds, a
//! connection made by any test running alongside may sit on that port (it happened in CI). Here
//! ports come from below the kernel's ephemeral range, where only explicit binds ever land, and
//! a process-wide cursor makes sure this process never hands out the same port twice.

use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

/// Lowest port handed out.
const FLOOR: u16 = 10_000;
/// Where the ephemeral range starts when the kernel does not say (Linux's default).
const DEFAULT_EPHEMERAL_LOW: u16 = 32_768;

/// Why no ports could be found.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("no free loopback port below the ephemeral range ({FLOOR}..{0}): every one is bound")]
    Exhausted(u16),
}

/// The cursor over `FLOOR..ephemeral_low`; `None` until first use.
static CURSOR: Mutex<Option<u16>> = Mutex::new(None);

/// The first port of the kernel's ephemeral range (`ip_local_port_range`).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > FLOOR + 1_000)
        .unwrap_or(DEFAULT_EPHEMERAL_LOW)
}

/// A start point that differs between processes, so two programs started together rarely
/// walk the same ports.
fn start_point(span: u16) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = (std::process::id().wrapping_mul(2_654_435_761)) ^ nanos;
    (mixed % u32::from(span)) as u16
}

/// `n` distinct ports on 127.0.0.1 that were free when chosen and that this process has not
/// handed out before (until it has walked the whole range once).
pub fn loopback_ports(n: usize) -> Result<Vec<u16>, PortError> {
    let low = ephemeral_low();
    let mut cursor = CURSOR.lock().unwrap_or_else(|p| p.into_inner());
    pick(&mut cursor, low, n)
}

/// Walks `FLOOR..low` from `cursor` (a random start when `None`) and takes the first `n` free
/// ports, leaving `cursor` just past the last one.
fn pick(cursor: &mut Option<u16>, low: u16, n: usize) -> Result<Vec<u16>, PortError> {
    let span = low - FLOOR;
    let mut next = cursor.unwrap_or_else(|| start_point(span)) % span;
    // Held until all `n` are chosen, so that no port is tested free and handed out twice.
    let mut held = Vec::with_capacity(n);
    let mut tried = 0u32;
    while held.len() < n {
        if tried >= u32::from(span) {
            return Err(PortError::Exhausted(low));
        }
        let port = FLOOR + next;
        next = (next + 1) % span;
        tried += 1;
        if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            held.push((port, listener));
        }
    }
    *cursor = Some(next);
    Ok(held.into_iter().map(|(port, _)| port).collect())
}

/// `n` ports for nodes that also listen on their port plus `offset` (Junction's peer port):
/// both of each pair were free when chosen, and neither is handed out again by this process
/// (the cursor moves past the highest). Returns the lower port of each pair.
pub fn loopback_port_pairs(n: usize, offset: u16) -> Result<Vec<u16>, PortError> {
    let low = ephemeral_low();
    let mut cursor = CURSOR.lock().unwrap_or_else(|p| p.into_inner());
    let span = low - FLOOR;
    if offset == 0 {
        return pick(&mut cursor, low, n);
    }
    let mut next = cursor.unwrap_or_else(|| start_point(span)) % span;
    let mut held = Vec::with_capacity(2 * n);
    let mut ports = Vec::with_capacity(n);
    let mut tried = 0u32;
    while ports.len() < n {
        if tried >= u32::from(span) {
            return Err(PortError::Exhausted(low));
        }
        tried += 1;
        let (port, upper) = (FLOOR + next, u32::from(FLOOR + next) + u32::from(offset));
        next = (next + 1) % span;
        if upper >= u32::from(low) {
            // Wrap around: the pair would reach into the ephemeral range.
            next = 0;
            continue;
        }
        let upper = upper as u16;
        if held.iter().any(|(p, _)| *p == port || *p == upper) {
            continue;
        }
        let (Ok(a), Ok(b)) = (
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)),
            TcpListener::bind((Ipv4Addr::LOCALHOST, upper)),
        ) else {
            continue;
        };
        held.push((port, a));
        held.push((upper, b));
        ports.push(port);
    }
    let highest = held.iter().map(|(p, _)| *p).max().unwrap_or(FLOOR);
    *cursor = Some((highest - FLOOR + 1) % span);
    Ok(ports)
}

/// One port, as [`loopback_ports`].
pub fn loopback_port() -> Result<u16, PortError> {
    loopback_ports(1)?
        .pop()
        .ok_or(PortError::Exhausted(ephemeral_low()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_below_the_ephemeral_range() -> Result<(), PortError> {
        let low = ephemeral_low();
        let first = loopback_ports(20)?;
        let second = loopback_ports(20)?;
        let all: std::collections::BTreeSet<u16> = first.iter().chain(&second).copied().collect();
        assert_eq!(
            all.len(),
            40,
            "a port was handed out twice: {first:?} {second:?}"
        );
        for port in &all {
            assert!(
                (FLOOR..low).contains(port),
                "port {port} outside {FLOOR}..{low}"
            );
            assert!(
                TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).is_ok(),
                "port {port} was handed out but is not free"
            );
        }
        Ok(())
    }

    #[test]
    fn pairs_are_free_distinct_and_not_handed_out_again() -> Result<(), PortError> {
        let pairs = loopback_port_pairs(3, 100)?;
        let later = loopback_ports(50)?;
        let mut all: Vec<u16> = pairs.iter().flat_map(|p| [*p, p + 100]).collect();
        all.extend(&later);
        let distinct: std::collections::BTreeSet<u16> = all.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            all.len(),
            "a port was handed out twice: {all:?}"
        );
        for port in pairs.iter().flat_map(|p| [*p, p + 100]) {
            assert!(
                TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok(),
                "port {port} was handed out but is not free"
            );
        }
        Ok(())
    }

    #[test]
    fn a_bound_port_is_skipped() -> Result<(), PortError> {
        let low = ephemeral_low();
        // Any port of the range that we can bind ourselves stands for "someone else's".
        let mut cursor = None;
        let busy_port = pick(&mut cursor, low, 1)?[0];
        let busy = TcpListener::bind((Ipv4Addr::LOCALHOST, busy_port))
            .expect("a port just found free can be bound");
        let mut cursor = Some(busy_port - FLOOR);
        let got = pick(&mut cursor, low, 1)?[0];
        assert_ne!(
            got, busy_port,
            "a port bound by someone else was handed out"
        );
        assert_eq!(cursor, Some((got - FLOOR + 1) % (low - FLOOR)));
        drop(busy);
        Ok(())
    }

    #[test]
    fn the_walk_wraps_at_the_top_of_the_range() -> Result<(), PortError> {
        let low = ephemeral_low();
        let mut cursor = Some(low - FLOOR - 1);
        let got = pick(&mut cursor, low, 3)?;
        assert!(got.iter().all(|p| (FLOOR..low).contains(p)), "{got:?}");
        assert!(
            got.iter().any(|p| *p < FLOOR + 100),
            "no wrap to the bottom: {got:?}"
        );
        Ok(())
    }
}

/// A tiny deterministic generator (SplitMix64) for seeded model and property tests: the same
/// seed gives the same run on every machine, without a dependency on `rand`.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// The bootstrap admin token a node wrote to `path` (`--admin-token-file`), once the file is
/// complete (a token ends with its newline); otherwise why it cannot be read yet.
pub fn read_admin_token(path: &std::path::Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.ends_with('\n') && !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => Err("the file is still being written".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}
