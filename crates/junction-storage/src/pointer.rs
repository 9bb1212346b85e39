//! Message pointers: what the `messages` column family holds for a message whose bytes are
//! in its partition's segment log, instead of a second copy of them.
//!
//! A stored message value is either an inline record (versions 1 and 2 of
//! `junction_raft::format::RECORD`, opaque here) or a pointer (version 3):
//!
//! | bytes | field |
//! |---|---|
//! | 1 | version `3` |
//! | 4 | CRC32C (little endian) of the 20 bytes after it |
//! | 8 | log index of the entry that carries the message (little endian) |
//! | 4 | ordinal of the message among the entry's records, counting every record the entry carries (little endian) |
//! | 8 | the timestamp the message was stored with (little endian) |
//!
//! Reads resolve pointers ([`crate::Store::scan_messages`]): the entry is read from the
//! segment log and an [`EntryRecords`] (installed by the Raft layer, which knows the entry
//! format) encodes the record exactly as an inline copy would have been, so every reader,
//! checksum and digest sees one format.

use junction_types::GroupId;

/// The version byte of a pointer.
pub const VERSION: u8 = 3;
/// The length of an encoded pointer.
pub const LEN: usize = 25;

/// Where a stored message's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    /// The log index of the entry that carries the message.
    pub index: u64,
    /// The message's place among the records the entry carries.
    pub ordinal: u32,
    /// The timestamp the message was stored with.
    pub timestamp_ms: i64,
}

impl Pointer {
    /// Encodes the pointer.
    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0] = VERSION;
        b[5..13].copy_from_slice(&self.index.to_le_bytes());
        b[13..17].copy_from_slice(&self.ordinal.to_le_bytes());
        b[17..25].copy_from_slice(&self.timestamp_ms.to_le_bytes());
        let crc = crc32c::crc32c(&b[5..]);
        b[1..5].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a stored message value: `Ok(None)` for an inline record, `Err` (the detail)
    /// for a pointer that is cut short or fails its checksum.
    pub fn decode(b: &[u8]) -> Result<Option<Self>, String> {
        if b.first() != Some(&VERSION) {
            return Ok(None);
        }
        let body: &[u8; LEN] = b
            .try_into()
            .map_err(|_| format!("a message pointer of {} bytes, not {LEN}", b.len()))?;
        let le4 = |at: usize| [body[at], body[at + 1], body[at + 2], body[at + 3]];
        let le8 = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&body[at..at + 8]);
            x
        };
        let crc = u32::from_le_bytes(le4(1));
        if crc32c::crc32c(&body[5..]) != crc {
            return Err("a message pointer fails its checksum".to_owned());
        }
        Ok(Some(Self {
            index: u64::from_le_bytes(le8(5)),
            ordinal: u32::from_le_bytes(le4(13)),
            timestamp_ms: i64::from_le_bytes(le8(17)),
        }))
    }
}

/// Turns log entries into stored records: the Raft layer's knowledge of its entry format,
/// installed in the store with [`crate::Store::set_entry_records`].
pub trait EntryRecords: Send + Sync {
    /// Decodes the entry at `index` of `group`: its bytes as the segment log holds them,
    /// read out of a frame whose checksum matched (so the entry's own need not be checked
    /// again).
    fn open(
        &self,
        group: GroupId,
        index: u64,
        entry: &[u8],
    ) -> Result<Box<dyn EntryMessages>, String>;
}

/// The records one decoded entry carries.
pub trait EntryMessages {
    /// Encodes record `ordinal` as an inline stored record with `timestamp_ms`.
    fn record(&self, ordinal: u32, timestamp_ms: i64) -> Result<Vec<u8>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_bytes_are_frozen() {
        let p = Pointer {
            index: 0x0102_0304_0506_0708,
            ordinal: 9,
            timestamp_ms: 1_700_000_000_000,
        };
        let b = p.encode();
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(hex, "031ad98ef90807060504030201090000000068e5cf8b010000");
        assert_eq!(Pointer::decode(&b), Ok(Some(p)));
    }

    #[test]
    fn inline_records_are_not_pointers_and_damage_is_named() {
        assert_eq!(Pointer::decode(&[2, 0, 0]), Ok(None));
        assert_eq!(Pointer::decode(&[]), Ok(None));
        let mut b = Pointer {
            index: 5,
            ordinal: 0,
            timestamp_ms: 1,
        }
        .encode();
        assert!(Pointer::decode(&b[..24]).unwrap_err().contains("24 bytes"));
        b[10] ^= 0x10;
        assert!(Pointer::decode(&b).unwrap_err().contains("checksum"));
    }
}
