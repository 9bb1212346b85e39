//! Segment files: the Raft log of a partition group, in append-only files outside RocksDB.
//!
//! A log entry is written once, to the end of its group's newest segment, and fsynced there;
//! it never passes through RocksDB's WAL, memtables, flushes or compactions. Whole segments
//! are deleted when Raft purges the entries they hold.
//!
//! Layout: `<store>/segments/<group, 20 digits>/<first index, 20 digits>.seg`. A file is a
//! header and then frames, back to back:
//!
//! | part   | bytes | content                                                          |
//! |--------|-------|------------------------------------------------------------------|
//! | header | 28    | `JSEG` · version u8 · 3 × 0 · group u64 · first index u64 · crc32c u32 of the 24 bytes before |
//! | frame  | 16 + n| payload length u32 · crc32c u32 of (index ‖ payload) · index u64 · payload |
//!
//! Integers are little-endian. The payload is opaque here (an encoded openraft entry).
//!
//! Recovery: the newest segment is read through on open; its first frame that is cut short or
//! fails its checksum, and everything after it, is what a crash left unsynced: the file is
//! truncated there. Older segments were fsynced before the next one was created, so a bad
//! frame in one of them is corruption and is reported, never skipped. A newest segment whose
//! header is incomplete (the crash came as it was created) holds no entry and is removed.
//!
//! Durability: [`SegmentLog::append`] writes the frames and hands the files (and any
//! directory that gained an entry) to the store's flusher thread, which fsyncs them for
//! every group at once (group commit) and then calls back. Truncation and purging change
//! what survives a restart, so they sync before they return.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{IoSlice, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use junction_types::GroupId;
use parking_lot::Mutex;

use crate::StorageError;

/// The version every segment header carries; a reader refuses any other.
pub const SEGMENT_VERSION: u8 = 1;
const MAGIC: &[u8; 4] = b"JSEG";
/// Bytes of a segment header.
pub const HEADER_LEN: usize = 28;
/// Bytes of a frame before its payload.
pub const FRAME_HEADER_LEN: usize = 16;
/// The largest payload a frame may declare; a longer one is a torn or corrupt length.
const MAX_PAYLOAD: u32 = 1 << 30;
/// A segment takes no more entries once it is this long (it may end a little past it).
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
const SUFFIX: &str = "seg";

/// Encodes the header of the segment of `group` that starts at `first`.
pub fn encode_header(group: GroupId, first: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = SEGMENT_VERSION;
    h[8..16].copy_from_slice(&group.to_le_bytes());
    h[16..24].copy_from_slice(&first.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Encodes the frame header of entry `index` with `payload`.
pub fn encode_frame_header(index: u64, payload: &[u8]) -> [u8; FRAME_HEADER_LEN] {
    let mut f = [0u8; FRAME_HEADER_LEN];
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    f[..4].copy_from_slice(&len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), payload);
    f[4..8].copy_from_slice(&crc.to_le_bytes());
    f[8..16].copy_from_slice(&index.to_le_bytes());
    f
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// What a header says, or why it cannot be used.
#[derive(Debug, PartialEq, Eq)]
enum Header {
    Valid {
        group: GroupId,
        first: u64,
    },
    /// Too short or failing its checksum: a crash while the file was created.
    Torn,
    /// Written by a build with another segment format.
    Version(u8),
}

fn decode_header(b: &[u8]) -> Header {
    if b.len() < HEADER_LEN || &b[..4] != MAGIC || crc32c::crc32c(&b[..24]) != le_u32(b, 24) {
        return Header::Torn;
    }
    if b[4] != SEGMENT_VERSION {
        return Header::Version(b[4]);
    }
    Header::Valid {
        group: le_u64(b, 8),
        first: le_u64(b, 16),
    }
}

/// One frame found at some position: its index and payload range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameAt {
    index: u64,
    payload_len: u32,
}

/// Checks the frame at the start of `b`; `None` if it is cut short or fails its checksum.
fn check_frame(b: &[u8]) -> Option<FrameAt> {
    if b.len() < FRAME_HEADER_LEN {
        return None;
    }
    let len = le_u32(b, 0);
    if len > MAX_PAYLOAD || b.len() < FRAME_HEADER_LEN + len as usize {
        return None;
    }
    let index = le_u64(b, 8);
    let payload = &b[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len as usize];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&index.to_le_bytes()), payload);
    (crc == le_u32(b, 4)).then_some(FrameAt {
        index,
        payload_len: len,
    })
}

/// Whether a frame that fails its check at file position `pos`, with `rest` the bytes from
/// there to the end of the file, is what a crash leaves of unsynced appends rather than
/// damage to a synced entry: the frame is cut short by the end of the file, or a 512-byte
/// sector within it reads as zeros (written blocks never reached the disk). A whole frame
/// with neither is damage, and is reported rather than cut away with what follows it.
fn is_torn(rest: &[u8], pos: u64) -> bool {
    if rest.len() < FRAME_HEADER_LEN {
        return true;
    }
    let len = le_u32(rest, 0);
    let frame_end = FRAME_HEADER_LEN.saturating_add(len as usize);
    if len > MAX_PAYLOAD || frame_end > rest.len() {
        return true;
    }
    const SECTOR: u64 = 512;
    let frame = &rest[..frame_end];
    if frame.iter().all(|b| *b == 0) {
        return true;
    }
    // Sectors wholly inside the frame.
    let first_sector = pos.div_ceil(SECTOR) * SECTOR;
    let mut s = first_sector;
    while s + SECTOR <= pos + frame.len() as u64 {
        let a = (s - pos) as usize;
        if frame[a..a + SECTOR as usize].iter().all(|b| *b == 0) {
            return true;
        }
        s += SECTOR;
    }
    false
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Fsyncs a directory, so that the entries created or removed in it survive a crash.
fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

/// Files and directories that must be fsynced before appends written so far are durable.
#[derive(Default)]
pub(crate) struct SyncSet {
    pub(crate) files: Vec<Arc<File>>,
    pub(crate) dirs: Vec<PathBuf>,
}

impl SyncSet {
    fn add_file(&mut self, f: &Arc<File>) {
        if !self.files.iter().any(|x| Arc::ptr_eq(x, f)) {
            self.files.push(f.clone());
        }
    }

    fn add_dir(&mut self, d: &Path) {
        if !self.dirs.iter().any(|x| x == d) {
            self.dirs.push(d.to_path_buf());
        }
    }

    /// Fsyncs everything in the set.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        for d in &self.dirs {
            File::open(d)?.sync_all()?;
        }
        Ok(())
    }

    /// Moves the members of `others` into one set, each file and directory once (a flush
    /// round can hold many appends to the same files).
    pub(crate) fn union(others: impl IntoIterator<Item = SyncSet>) -> SyncSet {
        let mut out = SyncSet::default();
        let mut seen = std::collections::HashSet::new();
        for other in others {
            for f in other.files {
                if seen.insert(Arc::as_ptr(&f)) {
                    out.files.push(f);
                }
            }
            for d in other.dirs {
                out.add_dir(&d);
            }
        }
        out
    }
}

struct Segment {
    first: u64,
    path: PathBuf,
    /// The open file of the newest segment (appends go there). A sealed segment is opened
    /// for each read and closed after it, so the files a node holds open do not grow with
    /// the data it keeps.
    file: Option<Arc<File>>,
    /// Where entry `first + i`'s frame starts.
    positions: Vec<u64>,
    /// The end of the last frame: where the next one goes.
    len: u64,
}

impl Segment {
    fn last(&self) -> Option<u64> {
        (!self.positions.is_empty()).then(|| self.first + self.positions.len() as u64 - 1)
    }

    /// The end of entry `first + i`'s frame.
    fn end_of(&self, i: usize) -> u64 {
        self.positions.get(i + 1).copied().unwrap_or(self.len)
    }

    /// A handle to read the segment: the newest one's own, or a new one for a sealed segment.
    fn reader(&self) -> Result<Arc<File>, StorageError> {
        match &self.file {
            Some(f) => Ok(f.clone()),
            None => File::open(&self.path)
                .map(Arc::new)
                .map_err(io_err("open segment", &self.path)),
        }
    }

    /// The handle appends and truncations go through, opened if the segment was sealed.
    fn writer(&mut self) -> Result<Arc<File>, StorageError> {
        if let Some(f) = &self.file {
            return Ok(f.clone());
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .append(true)
                .open(&self.path)
                .map_err(io_err("open segment", &self.path))?,
        );
        self.file = Some(f.clone());
        Ok(f)
    }
}

/// One group's segments, ordered and contiguous.
pub(crate) struct GroupLog {
    group: GroupId,
    root: PathBuf,
    dir: PathBuf,
    segments: Vec<Segment>,
    segment_bytes: u64,
    /// The first index Raft may read: entries below it were purged, though the segment
    /// holding them may remain while it holds later ones too, or while messages point into it.
    floor: u64,
    /// The first index stored messages may point to (see [`crate::pointer`]): no segment
    /// holding an entry at or above it is removed, purged or not. 0 until the state machine
    /// says otherwise: everything is kept.
    keep_from: u64,
    /// A `keep_from` the state machine wrote, not yet known durable (see
    /// [`crate::SegmentLog::release_below`]).
    pending_release: u64,
    /// Readers that may resolve pointers at or above an index: no segment they need goes
    /// while they read. Index → how many readers.
    pins: std::collections::BTreeMap<u64, usize>,
    /// Every entry below this index is fsynced.
    durable_below: u64,
    /// Bumped by every truncation, so a flush that completes after one never marks the
    /// entries that replaced the truncated ones as durable.
    generation: u64,
    /// What must be synced before the appends so far are durable.
    dirty: SyncSet,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.{SUFFIX}")
}

/// Returns the directory of `group`'s segments under `root`.
pub fn group_dir(root: &Path, group: GroupId) -> PathBuf {
    root.join(format!("{group:020}"))
}

impl GroupLog {
    /// Opens `group`'s segments under `root`, recovering the newest one's tail; removes the
    /// segments wholly at or below `discard_through` (purged, but still on disk after a crash).
    pub(crate) fn open(
        root: &Path,
        group: GroupId,
        discard_through: Option<u64>,
        segment_bytes: u64,
    ) -> Result<Self, StorageError> {
        let dir = group_dir(root, group);
        let mut log = Self {
            group,
            root: root.to_path_buf(),
            dir: dir.clone(),
            segments: Vec::new(),
            segment_bytes,
            floor: discard_through.map_or(0, |d| d.saturating_add(1)),
            keep_from: 0,
            pending_release: 0,
            pins: std::collections::BTreeMap::new(),
            durable_below: 0,
            generation: 0,
            dirty: SyncSet::default(),
        };
        if !dir.exists() {
            return Ok(log);
        }
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io_err("list segments", &dir))? {
            let entry = entry.map_err(io_err("list segments", &dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some(stem) = name.strip_suffix(&format!(".{SUFFIX}")) else {
                continue;
            };
            let first: u64 = stem.parse().map_err(|_| StorageError::Corrupt {
                what: "segment file name",
                group,
                detail: format!("{}", entry.path().display()),
            })?;
            firsts.push(first);
        }
        firsts.sort_unstable();
        let count = firsts.len();
        let mut removed = false;
        for (i, first) in firsts.into_iter().enumerate() {
            let newest = i + 1 == count;
            let path = dir.join(segment_name(first));
            match log.load(&path, first, newest)? {
                Some(seg) => log.segments.push(seg),
                None => {
                    std::fs::remove_file(&path).map_err(io_err("remove torn segment", &path))?;
                    removed = true;
                }
            }
        }
        // Empty segments that are not the newest. Segments a purge covered whole stay until
        // the state machine says no message points into them ([`GroupLog::release_below`]).
        let newest = log.segments.len().saturating_sub(1);
        let mut keep = Vec::with_capacity(log.segments.len());
        for (i, seg) in std::mem::take(&mut log.segments).into_iter().enumerate() {
            if seg.last().is_none() && i != newest {
                std::fs::remove_file(&seg.path).map_err(io_err("remove segment", &seg.path))?;
                removed = true;
            } else {
                keep.push(seg);
            }
        }
        log.segments = keep;
        if removed {
            sync_dir(&dir)?;
        }
        for pair in log.segments.windows(2) {
            let expected = pair[0].last().map_or(pair[0].first, |l| l + 1);
            // A gap is where a log emptied by a purge went on after it (a snapshot installed
            // past its end), the segments before the gap kept for the messages pointing in.
            let purged_gap = pair[1].first > expected && pair[1].first <= log.floor;
            if pair[1].first != expected && !purged_gap {
                return Err(StorageError::Corrupt {
                    what: "segment sequence",
                    group,
                    detail: format!(
                        "{} ends before index {expected}, but the next segment starts at {}",
                        pair[0].path.display(),
                        pair[1].first
                    ),
                });
            }
        }
        // Only the newest segment stays open.
        let count = log.segments.len();
        for seg in log.segments.iter_mut().take(count.saturating_sub(1)) {
            seg.file = None;
        }
        // What a crash left in the page cache is on disk from here on.
        if let Some(seg) = log.segments.last_mut() {
            seg.writer()?
                .sync_data()
                .map_err(io_err("sync segment", &seg.path))?;
        }
        log.durable_below = log.held_last().map_or(0, |l| l + 1);
        Ok(log)
    }

    /// Loads one segment; `None` for a newest segment whose header a crash cut short.
    fn load(&self, path: &Path, first: u64, newest: bool) -> Result<Option<Segment>, StorageError> {
        let group = self.group;
        let corrupt = |detail: String| StorageError::Corrupt {
            what: "segment",
            group,
            detail: format!("{}: {detail}", path.display()),
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map_err(io_err("open segment", path))?;
        let size = file.metadata().map_err(io_err("stat segment", path))?.len();
        let mut head = vec![0u8; HEADER_LEN.min(size as usize)];
        file.read_exact_at(&mut head, 0)
            .map_err(io_err("read segment", path))?;
        match decode_header(&head) {
            Header::Valid { group: g, first: f } if g == group && f == first => {}
            Header::Valid { group: g, first: f } => {
                return Err(corrupt(format!(
                    "header names group {g} from index {f}, the file name group {group} from {first}"
                )));
            }
            Header::Version(v) => {
                return Err(StorageError::SegmentVersion {
                    path: path.to_path_buf(),
                    found: v,
                    supported: SEGMENT_VERSION,
                });
            }
            Header::Torn if newest => return Ok(None),
            Header::Torn => return Err(corrupt("header is damaged".into())),
        }
        let mut positions = Vec::new();
        let mut pos = HEADER_LEN as u64;
        if newest {
            // Read through, checking every frame: the first bad one starts the unsynced tail.
            let mut body = vec![0u8; (size - pos) as usize];
            file.read_exact_at(&mut body, pos)
                .map_err(io_err("read segment", path))?;
            let mut at = 0usize;
            while at < body.len() {
                match check_frame(&body[at..]) {
                    Some(fr) if fr.index == first + positions.len() as u64 => {
                        positions.push(pos + at as u64);
                        at += FRAME_HEADER_LEN + fr.payload_len as usize;
                    }
                    Some(fr) => {
                        return Err(corrupt(format!(
                            "the frame at {} holds index {}, expected {}",
                            pos + at as u64,
                            fr.index,
                            first + positions.len() as u64
                        )));
                    }
                    None if is_torn(&body[at..], pos + at as u64) => break,
                    None => {
                        return Err(corrupt(format!(
                            "the frame of entry {} at {} fails its checksum (whole, not torn)",
                            first + positions.len() as u64,
                            pos + at as u64
                        )));
                    }
                }
            }
            let end = pos + at as u64;
            if end < size {
                tracing::warn!(
                    group,
                    segment = %path.display(),
                    kept = positions.len(),
                    cut_bytes = size - end,
                    "segment ends in a torn write; truncating it to its last whole entry"
                );
                file.set_len(end)
                    .map_err(io_err("truncate segment", path))?;
                file.sync_data().map_err(io_err("sync segment", path))?;
            }
            pos = end;
        } else {
            // Sealed: walk the frame headers (payload checksums are checked on read), read
            // in windows so that small frames do not cost a read each.
            const WINDOW: u64 = 64 << 10;
            let mut window: Vec<u8> = Vec::new();
            let mut window_at = 0u64;
            while pos < size {
                if size - pos < FRAME_HEADER_LEN as u64 {
                    return Err(corrupt(format!("a frame header is cut short at {pos}")));
                }
                if pos + FRAME_HEADER_LEN as u64 > window_at + window.len() as u64 {
                    window.resize((size - pos).min(WINDOW) as usize, 0);
                    file.read_exact_at(&mut window, pos)
                        .map_err(io_err("read segment", path))?;
                    window_at = pos;
                }
                let at = (pos - window_at) as usize;
                let fh = &window[at..at + FRAME_HEADER_LEN];
                let len = u64::from(le_u32(fh, 0));
                let index = le_u64(fh, 8);
                let expected = first + positions.len() as u64;
                if index != expected || pos + FRAME_HEADER_LEN as u64 + len > size {
                    return Err(corrupt(format!(
                        "frame at {pos} (index {index}, {len} bytes) does not follow index {} \
                         within the file's {size} bytes",
                        expected.saturating_sub(1)
                    )));
                }
                positions.push(pos);
                pos += FRAME_HEADER_LEN as u64 + len;
            }
        }
        Ok(Some(Segment {
            first,
            path: path.to_path_buf(),
            file: Some(Arc::new(file)),
            positions,
            len: pos,
        }))
    }

    pub(crate) fn first_index(&self) -> Option<u64> {
        let last = self.last_index()?;
        let first = self
            .segments
            .iter()
            .find(|s| !s.positions.is_empty())
            .map(|s| s.first)?;
        let first = first.max(self.floor);
        (first <= last).then_some(first)
    }

    /// The last index Raft may read (`None` when everything held is purged).
    pub(crate) fn last_index(&self) -> Option<u64> {
        self.held_last().filter(|l| *l >= self.floor)
    }

    /// The last index on disk, purged or not.
    fn held_last(&self) -> Option<u64> {
        self.segments.iter().rev().find_map(Segment::last)
    }

    /// Starts a new segment at `first` (its header written, not yet synced).
    fn create(&mut self, first: u64) -> Result<(), StorageError> {
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir).map_err(io_err("create segment dir", &self.dir))?;
            self.dirty.add_dir(&self.root);
            if let Some(parent) = self.root.parent() {
                self.dirty.add_dir(parent);
            }
        }
        let path = self.dir.join(segment_name(first));
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("create segment", &path))?;
        // A leftover of the same name (a segment removed by a truncation whose directory
        // sync was lost) is started over.
        file.set_len(0).map_err(io_err("create segment", &path))?;
        file.write_all(&encode_header(self.group, first))
            .map_err(io_err("write segment header", &path))?;
        let file = Arc::new(file);
        self.dirty.add_file(&file);
        self.dirty.add_dir(&self.dir);
        // The newest until now is sealed: closed once its pending syncs and reads are done.
        if let Some(last) = self.segments.last_mut() {
            last.file = None;
        }
        self.segments.push(Segment {
            first,
            path,
            file: Some(file),
            positions: Vec::new(),
            len: HEADER_LEN as u64,
        });
        Ok(())
    }

    /// Appends entries (consecutive indexes, following the last one unless the log is empty).
    pub(crate) fn append(&mut self, entries: &[(u64, &[u8])]) -> Result<u64, StorageError> {
        let mut written = 0u64;
        let mut i = 0;
        while i < entries.len() {
            let index = entries[i].0;
            let expected = self.last_index().map(|l| l + 1);
            // Past a snapshot installed beyond the log's end, the log goes on after the
            // snapshot; segments kept for pointers stay before the gap. openraft counts the
            // entries the snapshot covers as purged from the moment it accepts the snapshot,
            // and may hand over the next entries before it asks the log to purge them (seen
            // in chaos: a rejoining replica got its second snapshot, then entry 99098 after
            // its last entry 98809, before the purge through 99097). So a jump forward is
            // that purge, implied: nothing below it is read any more. Only going back over
            // held entries (without a truncation first) is refused.
            if let Some(e) = expected {
                if e > index {
                    return Err(StorageError::Corrupt {
                        what: "log append",
                        group: self.group,
                        detail: format!(
                            "entry {index} does not follow the last entry {}",
                            e.saturating_sub(1)
                        ),
                    });
                }
                if e < index {
                    self.floor = self.floor.max(index);
                }
            }
            let roll = match self.segments.last() {
                None => true,
                Some(s) => {
                    (s.len >= self.segment_bytes && !s.positions.is_empty())
                        || (s.positions.is_empty() && s.first != index)
                        || s.last().is_some_and(|l| l + 1 != index)
                }
            };
            if roll {
                if let Some(s) = self.segments.last()
                    && s.positions.is_empty()
                {
                    // An empty newest segment that starts elsewhere (after a purge of all).
                    let s = self.segments.pop().ok_or(StorageError::Poisoned)?;
                    std::fs::remove_file(&s.path).map_err(io_err("remove segment", &s.path))?;
                }
                self.create(index)?;
                written += HEADER_LEN as u64;
            }
            let seg = self.segments.last_mut().ok_or(StorageError::Poisoned)?;
            // Every entry that fits this segment, in one vectored write.
            let mut heads = Vec::new();
            let mut end = seg.len;
            let mut n = 0;
            while i + n < entries.len() && (n == 0 || end < self.segment_bytes) {
                let (idx, payload) = entries[i + n];
                let want = index + n as u64;
                if idx != want {
                    return Err(StorageError::Corrupt {
                        what: "log append",
                        group: self.group,
                        detail: format!("entry {idx} stands where entry {want} belongs"),
                    });
                }
                if payload.len() > MAX_PAYLOAD as usize {
                    return Err(StorageError::Corrupt {
                        what: "log append",
                        group: self.group,
                        detail: format!(
                            "entry {idx} is {} bytes, above the frame limit of {MAX_PAYLOAD}",
                            payload.len()
                        ),
                    });
                }
                heads.push(encode_frame_header(idx, payload));
                end += (FRAME_HEADER_LEN + payload.len()) as u64;
                n += 1;
            }
            let mut slices = Vec::with_capacity(2 * n);
            for (k, h) in heads.iter().enumerate() {
                slices.push(IoSlice::new(h));
                slices.push(IoSlice::new(entries[i + k].1));
            }
            let file = seg.writer()?;
            write_all_vectored(&file, &mut slices).map_err(io_err("append", &seg.path))?;
            let mut pos = seg.len;
            for k in 0..n {
                seg.positions.push(pos);
                pos += (FRAME_HEADER_LEN + entries[i + k].1.len()) as u64;
            }
            written += pos - seg.len;
            seg.len = pos;
            self.dirty.add_file(&file);
            i += n;
        }
        Ok(written)
    }

    /// Takes what must be synced for the appends so far.
    pub(crate) fn take_dirty(&mut self) -> SyncSet {
        std::mem::take(&mut self.dirty)
    }

    /// Where the entries in `[from, to)` are: one span per segment that holds some of them.
    /// Reading the spans needs no lock: appends only add past them, and a segment removed
    /// meanwhile stays readable through the span's open file.
    pub(crate) fn plan_read(&self, from: u64, to: u64) -> Result<Vec<ReadSpan>, StorageError> {
        self.plan_read_kept(from.max(self.floor), to)
    }

    /// Like [`GroupLog::plan_read`], below Raft's purge point too: what is still on disk
    /// (pointers resolve there).
    pub(crate) fn plan_read_kept(&self, from: u64, to: u64) -> Result<Vec<ReadSpan>, StorageError> {
        let mut spans = Vec::new();
        for seg in &self.segments {
            let Some(last) = seg.last() else { continue };
            let lo = from.max(seg.first);
            let hi = to.min(last + 1);
            if lo >= hi {
                continue;
            }
            let (a, b) = ((lo - seg.first) as usize, (hi - seg.first) as usize);
            spans.push(ReadSpan {
                group: self.group,
                file: seg.reader()?,
                path: seg.path.clone(),
                start: seg.positions[a],
                end: seg.end_of(b - 1),
                entries: lo..hi,
            });
        }
        Ok(spans)
    }

    /// Visits entries in `[from, to)` in order; `visit` returns `false` to stop (the tests'
    /// way in; [`crate::SegmentLog::read`] reads outside the log's lock).
    #[cfg(test)]
    pub(crate) fn read(
        &self,
        from: u64,
        to: u64,
        visit: impl FnMut(u64, &[u8]) -> Result<bool, StorageError>,
    ) -> Result<(), StorageError> {
        read_spans(&self.plan_read(from, to)?, visit)
    }

    /// Removes every entry from `from` on, durably.
    pub(crate) fn truncate_from(&mut self, from: u64) -> Result<(), StorageError> {
        self.generation += 1;
        self.durable_below = self.durable_below.min(from);
        let mut removed_file = false;
        while let Some(seg) = self.segments.last() {
            if seg.first < from {
                break;
            }
            let seg = self.segments.pop().ok_or(StorageError::Poisoned)?;
            std::fs::remove_file(&seg.path).map_err(io_err("remove segment", &seg.path))?;
            removed_file = true;
        }
        if let Some(seg) = self.segments.last_mut()
            && seg.last().is_some_and(|l| l >= from)
        {
            let keep = (from - seg.first) as usize;
            let cut = seg.positions[keep];
            let file = seg.writer()?;
            file.set_len(cut)
                .map_err(io_err("truncate segment", &seg.path))?;
            file.sync_data()
                .map_err(io_err("sync segment", &seg.path))?;
            seg.positions.truncate(keep);
            seg.len = cut;
        }
        if removed_file {
            sync_dir(&self.dir)?;
        }
        // The last one left is the newest now: appends go there.
        if let Some(seg) = self.segments.last_mut() {
            seg.writer()?;
        }
        Ok(())
    }

    /// Hides the entries at or below `upto` from Raft's reads, and removes the segments no
    /// longer needed (see [`GroupLog::remove_unneeded`]), durably.
    pub(crate) fn purge_through(&mut self, upto: u64) -> Result<(), StorageError> {
        self.floor = self.floor.max(upto.saturating_add(1));
        self.remove_unneeded()
    }

    /// Records that no stored message points below `from` any more, and removes the
    /// segments no longer needed.
    pub(crate) fn release_below(&mut self, from: u64) -> Result<(), StorageError> {
        self.keep_from = self.keep_from.max(from);
        self.remove_unneeded()
    }

    /// Records a release the state machine wrote but did not yet make durable.
    pub(crate) fn set_pending_release(&mut self, from: u64) {
        self.pending_release = self.pending_release.max(from);
    }

    /// The release written so far: durable once the store's next flush completes.
    pub(crate) fn pending_release(&self) -> u64 {
        self.pending_release
    }

    /// Whether a segment would go once the pending release is durable.
    pub(crate) fn release_waiting(&self) -> bool {
        self.pending_release > self.keep_from
            && self.first_wholly_below(self.floor.min(self.pending_release).min(self.min_pin()))
    }

    /// Whether [`GroupLog::remove_unneeded`] would remove a segment now.
    fn has_unneeded(&self) -> bool {
        self.first_wholly_below(self.removable_below())
    }

    /// Whether every entry of the first segment is below `below`.
    fn first_wholly_below(&self, below: u64) -> bool {
        self.segments.first().is_some_and(|s| match s.last() {
            Some(l) => l < below,
            None => s.first < below,
        })
    }

    /// The lowest index a reader pinned (`u64::MAX`: none).
    fn min_pin(&self) -> u64 {
        self.pins.keys().next().copied().unwrap_or(u64::MAX)
    }

    /// Entries below this index are needed by nobody: purged by Raft, pointed to by no
    /// message, and pinned by no reader.
    fn removable_below(&self) -> u64 {
        self.floor.min(self.keep_from).min(self.min_pin())
    }

    /// Removes the segments whose entries are all needed by nobody, durably.
    fn remove_unneeded(&mut self) -> Result<(), StorageError> {
        let mut removed = false;
        while self.has_unneeded() {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(io_err("remove segment", &seg.path))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Keeps the segments that messages stored now may point to while a reader resolves
    /// them; returns the pin for [`GroupLog::unpin`].
    pub(crate) fn pin(&mut self) -> u64 {
        *self.pins.entry(self.keep_from).or_default() += 1;
        self.keep_from
    }

    pub(crate) fn unpin(&mut self, pin: u64) {
        if let Some(n) = self.pins.get_mut(&pin) {
            *n -= 1;
            if *n == 0 {
                self.pins.remove(&pin);
            }
        }
    }

    /// The generation and end of the appends so far: what [`GroupLog::mark_durable`] takes
    /// once they are synced.
    pub(crate) fn append_mark(&self) -> (u64, u64) {
        (self.generation, self.held_last().map_or(0, |l| l + 1))
    }

    /// Records that the entries below `below` are synced, unless a truncation came between.
    pub(crate) fn mark_durable(&mut self, generation: u64, below: u64) {
        if generation == self.generation {
            self.durable_below = self.durable_below.max(below);
        }
    }

    /// Every entry below this index is fsynced.
    pub(crate) fn durable_below(&self) -> u64 {
        self.durable_below
    }

    /// Removes every segment and the group's directory.
    pub(crate) fn remove_all(&mut self) -> Result<(), StorageError> {
        self.segments.clear();
        self.dirty = SyncSet::default();
        self.floor = 0;
        self.keep_from = 0;
        self.pending_release = 0;
        self.generation += 1;
        self.durable_below = 0;
        remove_group(&self.root, self.group)
    }

    /// Bytes in the group's segment files.
    pub(crate) fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Where entry `index`'s payload is: its segment file and the payload's position.
    pub(crate) fn locate(&self, index: u64) -> Option<(PathBuf, u64)> {
        let seg = self
            .segments
            .iter()
            .find(|s| s.last().is_some_and(|l| s.first <= index && index <= l))?;
        let at = seg.positions[(index - seg.first) as usize] + FRAME_HEADER_LEN as u64;
        Some((seg.path.clone(), at))
    }
}

/// Consecutive entries of one segment, located by [`GroupLog::plan_read`].
pub(crate) struct ReadSpan {
    group: GroupId,
    file: Arc<File>,
    path: PathBuf,
    start: u64,
    end: u64,
    entries: std::ops::Range<u64>,
}

/// Reads spans in order, checking each frame, and visits their entries; `visit` returns
/// `false` to stop.
pub(crate) fn read_spans(
    spans: &[ReadSpan],
    mut visit: impl FnMut(u64, &[u8]) -> Result<bool, StorageError>,
) -> Result<(), StorageError> {
    for span in spans {
        let mut buf = vec![0u8; (span.end - span.start) as usize];
        span.file
            .read_exact_at(&mut buf, span.start)
            .map_err(io_err("read segment", &span.path))?;
        let mut at = 0usize;
        for index in span.entries.clone() {
            let fr = check_frame(&buf[at..])
                .filter(|f| f.index == index)
                .ok_or_else(|| StorageError::Corrupt {
                    what: "log entry",
                    group: span.group,
                    detail: format!(
                        "{} at {}: the frame of entry {index} fails its checksum",
                        span.path.display(),
                        span.start + at as u64
                    ),
                })?;
            let payload =
                &buf[at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + fr.payload_len as usize];
            if !visit(index, payload)? {
                return Ok(());
            }
            at += FRAME_HEADER_LEN + fr.payload_len as usize;
        }
    }
    Ok(())
}

/// Removes the directory of `group`'s segments under `root`, durably.
pub(crate) fn remove_group(root: &Path, group: GroupId) -> Result<(), StorageError> {
    let dir = group_dir(root, group);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err("remove segments", &dir))?;
        sync_dir(root)?;
    }
    Ok(())
}

/// Writes every slice, however many calls it takes.
fn write_all_vectored(mut file: &File, mut slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the segment file took no bytes",
                ));
            }
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The groups whose segment logs are open, so that one group never has two writers.
#[derive(Default)]
pub(crate) struct Registry {
    open: Mutex<HashMap<GroupId, Weak<Mutex<GroupLog>>>>,
}

impl Registry {
    /// Returns the open log of `group`, or opens it.
    pub(crate) fn open(
        &self,
        root: &Path,
        group: GroupId,
        discard_through: Option<u64>,
        segment_bytes: u64,
    ) -> Result<Arc<Mutex<GroupLog>>, StorageError> {
        let mut open = self.open.lock();
        if let Some(log) = open.get(&group).and_then(Weak::upgrade) {
            if let Some(d) = discard_through {
                log.lock().purge_through(d)?;
            }
            return Ok(log);
        }
        let log = Arc::new(Mutex::new(GroupLog::open(
            root,
            group,
            discard_through,
            segment_bytes,
        )?));
        open.insert(group, Arc::downgrade(&log));
        open.retain(|_, w| w.strong_count() > 0);
        Ok(log)
    }

    /// Returns every open log.
    pub(crate) fn all(&self) -> Vec<Arc<Mutex<GroupLog>>> {
        self.open
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Returns the open log of `group`, if any.
    pub(crate) fn get(&self, group: GroupId) -> Option<Arc<Mutex<GroupLog>>> {
        self.open.lock().get(&group).and_then(Weak::upgrade)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(i: u64) -> Vec<u8> {
        format!("entry {i} {}", "x".repeat((i % 7) as usize * 10)).into_bytes()
    }

    fn append_range(log: &mut GroupLog, from: u64, to: u64) {
        let owned: Vec<(u64, Vec<u8>)> = (from..to).map(|i| (i, payload(i))).collect();
        let refs: Vec<(u64, &[u8])> = owned.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        log.append(&refs).unwrap();
        log.take_dirty().sync().unwrap();
    }

    /// A fresh log of `group` in a temp dir, holding entries `1..to`.
    fn written(group: GroupId, segment_bytes: u64, to: u64) -> (tempfile::TempDir, GroupLog) {
        let dir = tempfile::tempdir().unwrap();
        let mut log = GroupLog::open(dir.path(), group, None, segment_bytes).unwrap();
        append_range(&mut log, 1, to);
        (dir, log)
    }

    /// Flips bits of the byte at `at` in the file at `path`, as a failing disk would.
    fn flip(path: &Path, at: u64, mask: u8) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ mask], at).unwrap();
    }

    fn assert_corrupt(err: &StorageError, what: &str) {
        assert!(
            matches!(err, StorageError::Corrupt { what: w, .. } if *w == what),
            "expected corrupt {what}, got {err}"
        );
    }

    fn all(log: &GroupLog) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        log.read(0, u64::MAX, |i, b| {
            out.push((i, b.to_vec()));
            Ok(true)
        })
        .unwrap();
        out
    }

    fn expect_range(log: &GroupLog, from: u64, to: u64) {
        let want: Vec<(u64, Vec<u8>)> = (from..to).map(|i| (i, payload(i))).collect();
        assert_eq!(all(log), want);
    }

    fn files(root: &Path, group: GroupId) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(group_dir(root, group))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn header_and_frame_bytes_are_frozen() {
        assert_eq!(
            encode_header(7, 42).to_vec(),
            vec![
                b'J', b'S', b'E', b'G', 1, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0, 0, 0, 0,
                0, 208, 227, 227, 222
            ]
        );
        assert_eq!(
            encode_frame_header(5, b"abc").to_vec(),
            vec![3, 0, 0, 0, 18, 239, 144, 61, 5, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            decode_header(&encode_header(7, 42)),
            Header::Valid {
                group: 7,
                first: 42
            }
        );
    }

    #[test]
    fn appends_roll_into_segments_and_read_back_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = GroupLog::open(dir.path(), 3, None, 200).unwrap();
        assert_eq!(log.last_index(), None);
        append_range(&mut log, 1, 40);
        append_range(&mut log, 40, 41);
        assert!(files(dir.path(), 3).len() > 3, "small segments roll");
        expect_range(&log, 1, 41);
        // Empty and reversed ranges read nothing.
        for (a, b) in [(13, 13), (13, 10), (41, 50), (0, 1)] {
            log.read(a, b, |i, _| panic!("read {i} from [{a}, {b})"))
                .unwrap();
        }
        let mut part = Vec::new();
        log.read(10, 13, |i, b| {
            part.push((i, b.to_vec()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(part, (10..13).map(|i| (i, payload(i))).collect::<Vec<_>>());
        drop(log);
        let log = GroupLog::open(dir.path(), 3, None, 200).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (Some(1), Some(40)));
        expect_range(&log, 1, 41);
    }

    #[test]
    fn an_append_that_skips_an_index_inside_a_batch_or_goes_back_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = GroupLog::open(dir.path(), 1, None, 1 << 20).unwrap();
        append_range(&mut log, 5, 8);
        // Going back over held entries without a truncation first.
        let err = log.append(&[(6, b"x".as_slice())]).unwrap_err();
        assert_corrupt(&err, "log append");
        let err = log
            .append(&[(8, b"x".as_slice()), (10, b"y".as_slice())])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("entry 10 stands where entry 9 belongs"),
            "{err}"
        );
        // An index of 0 inside a batch names what was expected (no arithmetic below zero).
        let err = log
            .append(&[(8, b"x".as_slice()), (0, b"y".as_slice())])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("entry 0 stands where entry 9 belongs"),
            "{err}"
        );
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
        expect_range(&log, 5, 8);
    }

    /// openraft may hand over the entries after an installed snapshot before it asks the log
    /// to purge what the snapshot covers: the jump forward purges it, implied.
    #[test]
    fn a_jump_forward_past_the_end_is_the_purge_a_snapshot_implies() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = GroupLog::open(dir.path(), 1, None, 1 << 20).unwrap();
        append_range(&mut log, 5, 8);
        append_range(&mut log, 12, 14);
        assert_eq!(log.first_index(), Some(12));
        assert_eq!(log.last_index(), Some(13));
        expect_range(&log, 12, 14);
        // The log goes on from there; the purge that follows changes nothing.
        append_range(&mut log, 14, 15);
        log.purge_through(11).unwrap();
        expect_range(&log, 12, 15);
    }

    #[test]
    fn a_torn_tail_is_cut_to_the_last_whole_entry() {
        let (dir, log) = written(2, 1 << 20, 6);
        let path = files(dir.path(), 2).pop().unwrap();
        let good = std::fs::metadata(&path).unwrap().len();
        drop(log);
        // A crash in the middle of the next frame: its header and half its payload.
        let p7 = payload(6);
        let mut torn = encode_frame_header(6, &p7).to_vec();
        torn.extend_from_slice(&p7[..p7.len() / 2]);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn).unwrap();
        drop(f);
        let mut log = GroupLog::open(dir.path(), 2, None, 1 << 20).unwrap();
        assert_eq!(log.last_index(), Some(5));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "truncated");
        append_range(&mut log, 6, 8);
        expect_range(&log, 1, 8);
    }

    #[test]
    fn a_bad_checksum_in_a_whole_frame_of_the_newest_segment_is_damage_not_a_torn_tail() {
        let (dir, log) = written(2, 1 << 20, 10);
        let at = log.segments[0].positions[6] + FRAME_HEADER_LEN as u64 + 2;
        let path = log.segments[0].path.clone();
        drop(log);
        flip(&path, at, 0x10);
        let size = std::fs::metadata(&path).unwrap().len();
        let err = GroupLog::open(dir.path(), 2, None, 1 << 20).err().unwrap();
        assert_corrupt(&err, "segment");
        assert!(err.to_string().contains("entry 7"), "{err}");
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            size,
            "nothing was cut"
        );
    }

    #[test]
    fn a_tail_of_zeroed_sectors_is_a_torn_write() {
        let (dir, mut log) = written(2, 1 << 20, 4);
        let big = vec![7u8; 3000];
        log.append(&[(4, big.as_slice()), (5, b"after".as_slice())])
            .unwrap();
        log.take_dirty().sync().unwrap();
        let frame4 = log.segments[0].positions[3];
        let path = log.segments[0].path.clone();
        drop(log);
        // The blocks of entry 4's payload never reached the disk; entry 5's did.
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let zero_from = (frame4 + 600).div_ceil(512) * 512;
        f.write_all_at(&[0u8; 1024], zero_from).unwrap();
        let log = GroupLog::open(dir.path(), 2, None, 1 << 20).unwrap();
        assert_eq!(log.last_index(), Some(3));
        assert_eq!(f.metadata().unwrap().len(), frame4, "cut before entry 4");
        expect_range(&log, 1, 4);
    }

    #[test]
    fn damage_in_a_sealed_segment_is_reported_not_skipped() {
        let (dir, log) = written(2, 150, 30);
        let first = log.segments[0].path.clone();
        drop(log);
        // Cut the oldest segment in the middle of a frame.
        let len = std::fs::metadata(&first).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&first)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let err = GroupLog::open(dir.path(), 2, None, 150).err().unwrap();
        assert_corrupt(&err, "segment");
        // A flipped payload bit in a sealed segment passes the open (headers only) and is
        // caught by the read.
        let (dir, log) = written(2, 150, 30);
        let at = log.segments[0].positions[1] + FRAME_HEADER_LEN as u64;
        let path = log.segments[0].path.clone();
        drop(log);
        flip(&path, at, 0x01);
        let log = GroupLog::open(dir.path(), 2, None, 150).unwrap();
        let err = log.read(1, 30, |_, _| Ok(true)).unwrap_err();
        assert_corrupt(&err, "log entry");
    }

    #[test]
    fn a_newest_segment_with_a_torn_header_is_removed() {
        let (dir, log) = written(4, 1 << 20, 4);
        drop(log);
        let torn = group_dir(dir.path(), 4).join(segment_name(4));
        std::fs::write(&torn, &encode_header(4, 4)[..10]).unwrap();
        let mut log = GroupLog::open(dir.path(), 4, None, 1 << 20).unwrap();
        assert!(!torn.exists());
        assert_eq!(log.last_index(), Some(3));
        append_range(&mut log, 4, 6);
        expect_range(&log, 1, 6);
    }

    #[test]
    fn another_segment_version_is_refused() {
        let (dir, log) = written(4, 1 << 20, 3);
        let path = log.segments[0].path.clone();
        drop(log);
        let mut h = encode_header(4, 1);
        h[4] = 2;
        let crc = crc32c::crc32c(&h[..24]);
        h[24..28].copy_from_slice(&crc.to_le_bytes());
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&h, 0).unwrap();
        let err = GroupLog::open(dir.path(), 4, None, 1 << 20).err().unwrap();
        assert!(
            matches!(
                err,
                StorageError::SegmentVersion {
                    found: 2,
                    supported: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn truncation_removes_later_entries_durably() {
        let (dir, mut log) = written(5, 200, 30);
        let before = files(dir.path(), 5).len();
        log.truncate_from(12).unwrap();
        assert_eq!(log.last_index(), Some(11));
        assert!(files(dir.path(), 5).len() < before);
        expect_range(&log, 1, 12);
        // New entries at the truncated indexes (a new leader's).
        let fresh: Vec<(u64, Vec<u8>)> = (12..15)
            .map(|i| (i, format!("new {i}").into_bytes()))
            .collect();
        let refs: Vec<(u64, &[u8])> = fresh.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        log.append(&refs).unwrap();
        log.take_dirty().sync().unwrap();
        drop(log);
        let log = GroupLog::open(dir.path(), 5, None, 200).unwrap();
        let got = all(&log);
        assert_eq!(got.len(), 14);
        assert_eq!(got[10], (11, payload(11)));
        assert_eq!(got[11], (12, b"new 12".to_vec()));
        // Truncating everything leaves an empty log that takes any next index.
        let mut log = log;
        log.truncate_from(1).unwrap();
        assert_eq!(log.last_index(), None);
        append_range(&mut log, 1, 3);
        expect_range(&log, 1, 3);
    }

    #[test]
    fn purging_drops_whole_segments_and_reopen_discards_purged_leftovers() {
        let (dir, mut log) = written(6, 200, 40);
        log.release_below(u64::MAX).unwrap();
        let seg_first: Vec<u64> = log.segments.iter().map(|s| s.first).collect();
        log.purge_through(seg_first[2]).unwrap();
        // The segment holding seg_first[2] also holds later entries: it stays on disk, and
        // what was purged in it is no longer read.
        assert_eq!(log.segments[0].first, seg_first[2]);
        assert_eq!(log.first_index(), Some(seg_first[2] + 1));
        expect_range(&log, seg_first[2] + 1, 40);
        drop(log);
        // Reopen as after a crash that kept segments a purge had covered: hidden at once,
        // removed once nothing points into them.
        let mut log = GroupLog::open(dir.path(), 6, Some(seg_first[4] - 1), 200).unwrap();
        assert_eq!(log.first_index(), Some(seg_first[4]));
        expect_range(&log, seg_first[4], 40);
        assert_eq!(log.segments[0].first, seg_first[2]);
        log.release_below(u64::MAX).unwrap();
        assert_eq!(log.segments[0].first, seg_first[4]);
        assert_eq!(files(dir.path(), 6).len(), log.segments.len());
        // A purge beyond the last entry empties the log; the next append starts there.
        log.purge_through(100).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (None, None));
        append_range(&mut log, 101, 103);
        drop(log);
        let log = GroupLog::open(dir.path(), 6, Some(100), 200).unwrap();
        expect_range(&log, 101, 103);
    }

    #[test]
    fn segments_messages_point_into_outlive_the_raft_purge_until_released() {
        let (dir, mut log) = written(12, 200, 40);
        let seg_first: Vec<u64> = log.segments.iter().map(|s| s.first).collect();
        log.release_below(seg_first[3]).unwrap();
        // A snapshot installed past the end: Raft purges everything and goes on at 51.
        log.purge_through(50).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (None, None));
        assert_eq!(log.segments[0].first, seg_first[3], "kept for pointers");
        let pin = log.pin();
        assert_eq!(pin, seg_first[3]);
        append_range(&mut log, 51, 55);
        assert_eq!((log.first_index(), log.last_index()), (Some(51), Some(54)));
        // Entries kept for pointers are read past Raft's purge point, never by Raft.
        let mut kept = Vec::new();
        read_spans(
            &log.plan_read_kept(seg_first[3], seg_first[3] + 1).unwrap(),
            |i, b| {
                kept.push((i, b.to_vec()));
                Ok(true)
            },
        )
        .unwrap();
        assert_eq!(kept, vec![(seg_first[3], payload(seg_first[3]))]);
        assert!(log.plan_read(0, 51).unwrap().is_empty());
        drop(log);
        // The gap below the purge point is no corruption on reopen.
        let mut log = GroupLog::open(dir.path(), 12, Some(50), 200).unwrap();
        expect_range(&log, 51, 55);
        assert_eq!(log.segments[0].first, seg_first[3]);
        // A pin keeps what it covers after a release; unpinning lets it go.
        let pin2 = log.pin();
        assert_eq!(pin2, 0);
        log.release_below(51).unwrap();
        assert_eq!(log.segments[0].first, seg_first[3]);
        log.unpin(pin2);
        log.release_below(51).unwrap();
        assert_eq!(log.segments[0].first, 51);
        assert_eq!(files(dir.path(), 12).len(), log.segments.len());
        drop(log);
        // A gap above the purge point is corruption.
        let (dir, mut log) = written(14, 200, 10);
        log.purge_through(20).unwrap();
        append_range(&mut log, 21, 23);
        drop(log);
        let err = GroupLog::open(dir.path(), 14, Some(5), 200).err().unwrap();
        assert_corrupt(&err, "segment sequence");
        assert!(GroupLog::open(dir.path(), 14, Some(20), 200).is_ok());
    }

    /// Files of this process open under `dir`.
    fn open_files_under(dir: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(dir))
            .count()
    }

    #[test]
    fn sealed_segments_larger_than_the_read_window_reopen_whole() {
        let (dir, log) = written(16, 200 << 10, 12_000);
        assert!(log.segments.len() >= 2);
        assert!(log.segments[0].len > 64 << 10);
        drop(log);
        let log = GroupLog::open(dir.path(), 16, None, 200 << 10).unwrap();
        expect_range(&log, 1, 12_000);
    }

    #[test]
    fn only_the_newest_segment_stays_open() {
        let (dir, mut log) = written(15, 200, 40);
        assert!(log.segments.len() > 4);
        assert_eq!(open_files_under(dir.path()), 1);
        // Reads and a truncation into a sealed segment open what they need, and only the
        // segment left newest stays open.
        expect_range(&log, 1, 40);
        let middle = log.segments[2].first + 1;
        log.truncate_from(middle).unwrap();
        assert_eq!(open_files_under(dir.path()), 1);
        append_range(&mut log, middle, 45);
        drop(log);
        let log = GroupLog::open(dir.path(), 15, None, 200).unwrap();
        assert_eq!(open_files_under(dir.path()), 1);
        expect_range(&log, 1, 45);
    }

    #[test]
    fn durability_marks_skip_a_truncation_in_between() {
        let (dir, log) = written(13, 1 << 20, 10);
        drop(log);
        let mut log = GroupLog::open(dir.path(), 13, None, 1 << 20).unwrap();
        assert_eq!(
            log.durable_below(),
            10,
            "appends before a reopen are synced by it"
        );
        append_range(&mut log, 10, 15);
        let (generation, below) = log.append_mark();
        assert_eq!(below, 15);
        assert_eq!(log.durable_below(), 10);
        log.truncate_from(12).unwrap();
        append_range(&mut log, 12, 14);
        // The flush of the truncated appends completes late: it marks nothing.
        log.mark_durable(generation, below);
        assert_eq!(log.durable_below(), 10);
        let (generation, below) = log.append_mark();
        log.mark_durable(generation, below);
        assert_eq!(log.durable_below(), 14);
    }

    #[test]
    fn a_gap_between_segments_is_corruption() {
        let (dir, log) = written(8, 200, 30);
        let middle = log.segments[1].path.clone();
        drop(log);
        std::fs::remove_file(middle).unwrap();
        let err = GroupLog::open(dir.path(), 8, None, 200).err().unwrap();
        assert_corrupt(&err, "segment sequence");
    }
}
