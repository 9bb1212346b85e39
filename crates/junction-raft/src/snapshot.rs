//! Snapshot data: a stream of frames, never a whole copy in memory.
//!
//! On the sending node a snapshot is a [`LocalSnapshot`]: the state machine's small state
//! captured when the snapshot was built, plus a bound on the immutable data to dump (messages
//! below `next_offset`), read from a consistent RocksDB snapshot only while it is being sent.
//! On the receiving node the stream is spooled to a file and installed from there.
//!
//! Frame: `cf u8 · key_len u32 BE · key · value_len u32 BE · value`; cf 255 is the state frame
//! (always first; its key is the stream's version, [`SNAPSHOT_STREAM_VERSION`]), cf 254 the end frame (always last): its value is the number of bytes
//! before it. A stream that stops early (the sender died, or failed reading its store, and
//! closed the stream cleanly) has no valid end frame, so it is refused instead of being
//! installed as a smaller snapshot that silently lacks messages. (Chaos seed 11 found it: a
//! sender that stopped after the header left a receiver with an empty snapshot whose install
//! error stopped the group; cut at a later frame boundary it would have installed.)

use std::io::Read;
use std::path::PathBuf;

use junction_storage::Store;
use junction_storage::keys::{SM_CF_MESSAGES, SM_CF_SIZE_INDEX, SM_CF_TIME_INDEX, u64_at};
use junction_types::GroupId;

use crate::RaftStoreError;

/// The frame kind carrying the state machine's own state.
pub const FRAME_STATE: u8 = 255;
/// The version of the snapshot stream's layout (frames, and what the state frame holds),
/// carried as the key of the state frame.
pub const SNAPSHOT_STREAM_VERSION: u8 = 1;
/// The frame kind ending a complete snapshot.
pub const FRAME_END: u8 = 254;
/// Bytes of the end frame: cf, empty key, 8-byte value.
const END_FRAME_LEN: u64 = 1 + 4 + 4 + 8;
const MAX_KEY: usize = 1024;
const MAX_VALUE: usize = 256 << 20;

/// What a snapshot holds, on the sender or on the receiver.
#[derive(Debug)]
pub enum SnapshotData {
    /// This node's own state, dumped from RocksDB when sent.
    Local(LocalSnapshot),
    /// A snapshot received from a leader, spooled to this file.
    Received(PathBuf),
}

/// Which stored keys of the group belong to the snapshot.
#[derive(Debug, Clone, Copy)]
pub enum DumpFilter {
    /// Only the state frame (the metadata group keeps everything in its state).
    StateOnly,
    /// Messages (and time-index entries) with offsets below this bound. Messages are
    /// immutable once written, so reading them later gives the same bytes.
    MessagesBelow(u64),
}

/// A snapshot of this node's group state, read lazily.
#[derive(Debug, Clone)]
pub struct LocalSnapshot {
    pub store: Store,
    pub group: GroupId,
    pub state: Vec<u8>,
    pub filter: DumpFilter,
}

/// Appends one frame to `buf`.
pub fn write_frame(buf: &mut Vec<u8>, cf: u8, key: &[u8], value: &[u8]) {
    buf.push(cf);
    buf.extend_from_slice(&(key.len() as u32).to_be_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(&(value.len() as u32).to_be_bytes());
    buf.extend_from_slice(value);
}

/// Appends the end frame to a complete snapshot of which `before` bytes precede `buf`'s end
/// (everything sent so far plus `buf`).
pub fn write_end(buf: &mut Vec<u8>, before: u64) {
    write_frame(buf, FRAME_END, &[], &before.to_be_bytes());
}

/// Checks that the spooled snapshot at `path` is complete: it ends with an end frame that
/// counts exactly the bytes before it.
pub fn check_complete(path: &std::path::Path) -> Result<(), RaftStoreError> {
    use std::io::{Seek, SeekFrom};
    let truncated = RaftStoreError::BadSnapshot("truncated snapshot: no end frame");
    let mut f = std::fs::File::open(path)
        .map_err(|_| RaftStoreError::BadSnapshot("snapshot file is missing"))?;
    let len = f
        .metadata()
        .map_err(|_| RaftStoreError::BadSnapshot("unreadable snapshot file"))?
        .len();
    if len < END_FRAME_LEN {
        return Err(truncated);
    }
    let before = len - END_FRAME_LEN;
    f.seek(SeekFrom::Start(before))
        .map_err(|_| RaftStoreError::BadSnapshot("unreadable snapshot file"))?;
    let mut end = Vec::with_capacity(END_FRAME_LEN as usize);
    f.read_to_end(&mut end)
        .map_err(|_| RaftStoreError::BadSnapshot("unreadable snapshot file"))?;
    let mut expected = Vec::with_capacity(END_FRAME_LEN as usize);
    write_end(&mut expected, before);
    if end == expected {
        Ok(())
    } else {
        Err(truncated)
    }
}

/// Checks the checksum of every stored record a spooled partition snapshot carries, so that
/// a copy that changed on the sender's disk or on the way is refused before it is installed
/// (and never spreads to this replica); returns how many records it checked.
pub fn check_records(path: &std::path::Path) -> Result<u64, RaftStoreError> {
    let file = std::fs::File::open(path)
        .map_err(|_| RaftStoreError::BadSnapshot("snapshot file is missing"))?;
    let mut reader = FrameReader::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut checked = 0;
    while let Some(f) = reader.next_frame()? {
        if f.cf != junction_storage::keys::SM_CF_MESSAGES {
            continue;
        }
        crate::format::check_record(&f.value).map_err(|e| match e {
            RaftStoreError::Corrupt { what, detail } => RaftStoreError::Corrupt {
                what,
                detail: format!(
                    "offset {:?} of the snapshot: {detail}",
                    junction_storage::keys::u64_at(&f.key, 0)
                ),
            },
            other => other,
        })?;
        checked += 1;
    }
    Ok(checked)
}

impl LocalSnapshot {
    /// Streams the snapshot in chunks of about `chunk_bytes` to `tx`. Blocking: call it from
    /// `spawn_blocking`. Stops early (Ok) if the receiver is gone.
    pub fn dump(
        &self,
        chunk_bytes: usize,
        tx: &tokio::sync::mpsc::Sender<Vec<u8>>,
    ) -> Result<(), RaftStoreError> {
        let mut buf = Vec::with_capacity(chunk_bytes + 4096);
        let mut sent = 0u64;
        write_frame(
            &mut buf,
            FRAME_STATE,
            &[SNAPSHOT_STREAM_VERSION],
            &self.state,
        );
        if let DumpFilter::MessagesBelow(upto) = self.filter {
            let mut open = true;
            self.store.scan_group_sm(self.group, |cf, key, value| {
                let keep = match cf {
                    SM_CF_MESSAGES | SM_CF_SIZE_INDEX => u64_at(key, 0).is_some_and(|o| o < upto),
                    SM_CF_TIME_INDEX => u64_at(value, 0).is_some_and(|o| o < upto),
                    _ => false,
                };
                if keep {
                    write_frame(&mut buf, cf, key, value);
                    if buf.len() >= chunk_bytes {
                        let full =
                            std::mem::replace(&mut buf, Vec::with_capacity(chunk_bytes + 4096));
                        sent += full.len() as u64;
                        open = tx.blocking_send(full).is_ok();
                    }
                }
                Ok(open)
            })?;
            if !open {
                return Ok(());
            }
        }
        // Only a dump that got this far is complete: it alone carries the end frame.
        let before = sent + buf.len() as u64;
        write_end(&mut buf, before);
        let _closed = tx.blocking_send(buf);
        Ok(())
    }
}

/// Reads frames back; rejects oversized or truncated frames instead of allocating blindly.
pub struct FrameReader<R: Read> {
    r: R,
}

/// One decoded frame.
pub struct Frame {
    pub cf: u8,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

impl<R: Read> FrameReader<R> {
    pub fn new(r: R) -> Self {
        Self { r }
    }

    fn read_len(&mut self, max: usize) -> Result<usize, RaftStoreError> {
        let mut b = [0u8; 4];
        self.r
            .read_exact(&mut b)
            .map_err(|_| RaftStoreError::BadSnapshot("truncated frame length"))?;
        let n = u32::from_be_bytes(b) as usize;
        if n > max {
            return Err(RaftStoreError::BadSnapshot("frame larger than allowed"));
        }
        Ok(n)
    }

    /// Returns the next frame, or `None` at a clean end of stream.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, RaftStoreError> {
        let mut cf = [0u8; 1];
        match self.r.read(&mut cf) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(_) => return Err(RaftStoreError::BadSnapshot("unreadable frame")),
        }
        let klen = self.read_len(MAX_KEY)?;
        let mut key = vec![0u8; klen];
        self.r
            .read_exact(&mut key)
            .map_err(|_| RaftStoreError::BadSnapshot("truncated key"))?;
        let vlen = self.read_len(MAX_VALUE)?;
        let mut value = vec![0u8; vlen];
        self.r
            .read_exact(&mut value)
            .map_err(|_| RaftStoreError::BadSnapshot("truncated value"))?;
        Ok(Some(Frame {
            cf: cf[0],
            key,
            value,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stream_with_its_end_frame_is_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let mut buf = Vec::new();
        write_frame(&mut buf, FRAME_STATE, &[], b"state");
        write_frame(&mut buf, 0, &7u64.to_be_bytes(), b"msg");
        let body = buf.len();
        write_end(&mut buf, body as u64);
        std::fs::write(&path, &buf).unwrap();
        check_complete(&path).unwrap();
        // Cut at a frame boundary (a sender that stopped early): refused.
        std::fs::write(&path, &buf[..body]).unwrap();
        assert!(check_complete(&path).is_err());
        // Only the state frame, and nothing at all: refused.
        let mut state_only = Vec::new();
        write_frame(&mut state_only, FRAME_STATE, &[], b"state");
        std::fs::write(&path, &state_only).unwrap();
        assert!(check_complete(&path).is_err());
        std::fs::write(&path, b"").unwrap();
        assert!(check_complete(&path).is_err());
        // An end frame that counts other bytes than precede it: refused.
        let mut wrong = buf[..body].to_vec();
        write_end(&mut wrong, body as u64 - 1);
        std::fs::write(&path, &wrong).unwrap();
        assert!(check_complete(&path).is_err());
    }

    #[test]
    fn a_snapshot_carrying_a_changed_record_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let record = junction_types::StoredRecord {
            timestamp_ms: 1,
            key: None,
            headers: vec![],
            payload: b"intact".to_vec(),
        };
        let good = crate::format::encode_record(&record).unwrap();
        let write = |records: &[&[u8]]| {
            let mut buf = Vec::new();
            write_frame(&mut buf, FRAME_STATE, &[], b"state");
            for (i, r) in records.iter().enumerate() {
                write_frame(&mut buf, 0, &(i as u64).to_be_bytes(), r);
            }
            let body = buf.len();
            write_end(&mut buf, body as u64);
            std::fs::write(&path, &buf).unwrap();
        };
        write(&[&good, &good]);
        assert_eq!(check_records(&path).unwrap(), 2);
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        write(&[&good, &bad]);
        let e = check_records(&path).unwrap_err().to_string();
        assert!(
            e.contains("offset Some(1)") && e.contains("checksum mismatch"),
            "{e}"
        );
    }

    #[test]
    fn frames_round_trip_and_truncation_is_an_error() {
        let mut buf = Vec::new();
        write_frame(&mut buf, FRAME_STATE, &[], b"state");
        write_frame(&mut buf, 0, &7u64.to_be_bytes(), b"msg");
        let mut r = FrameReader::new(&buf[..]);
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!((f.cf, f.value.as_slice()), (FRAME_STATE, &b"state"[..]));
        let f = r.next_frame().unwrap().unwrap();
        assert_eq!((f.cf, f.key.as_slice()), (0, &7u64.to_be_bytes()[..]));
        assert!(r.next_frame().unwrap().is_none());
        let cut = &buf[..buf.len() - 1];
        let mut r = FrameReader::new(cut);
        r.next_frame().unwrap();
        assert!(r.next_frame().is_err());
    }
}
