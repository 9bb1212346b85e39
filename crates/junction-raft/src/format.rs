//! Versioned encodings of everything Junction persists or sends between nodes.
//!
//! Each structure has a [`Format`]: a name and a version. Its encoding is one version byte
//! followed by the postcard bytes of the value. The version of a structure is bumped whenever
//! its bytes change (a field added, removed, reordered or retyped, in it or in anything it
//! contains); the frozen-bytes tests (`tests` below) pin the bytes of every version 1, so such
//! a change fails a test until the version is bumped and the old bytes are still read (a
//! migration arm in the reader) or explicitly refused.
//!
//! Reading a version this build does not know is an error that names the structure and both
//! versions — never a default value: a node refuses data (or a peer's message) written by a
//! newer Junction instead of misreading it.
//!
//! Snapshot streams carry their own version in the key of their first frame
//! ([`crate::snapshot::SNAPSHOT_STREAM_VERSION`]); the protobuf messages of the gRPC API are
//! versioned by their package (`junction.v1`).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::RaftStoreError;

/// A persisted or wire structure: its name (for errors) and the version this build writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub what: &'static str,
    pub version: u8,
}

/// A Raft log entry (`openraft::Entry` with Junction's commands), as stored in a node's
/// log. Version 2 adds a CRC32C of the entry's bytes (see [`encode_log_entry`]); version 1
/// entries (written before) are still read, unchecked.
///
/// A new kind of command inside an entry (a new variant) leaves the bytes of every existing
/// entry as they were, so it does not bump this version: it is gated by the cluster's format
/// level instead ([`junction_types::format_level`]), and written only once every member
/// reads it. Bumping this version would make every entry unreadable to older members during
/// a rolling upgrade.
pub const LOG_ENTRY: Format = Format {
    what: "log entry",
    version: 2,
};
/// A vote, stored and sent with snapshots.
pub const VOTE: Format = Format {
    what: "vote",
    version: 1,
};
/// A log id: the committed, last purged and last applied positions.
pub const LOG_ID: Format = Format {
    what: "log id",
    version: 1,
};
/// The last membership a state machine applied.
pub const MEMBERSHIP: Format = Format {
    what: "membership",
    version: 1,
};
/// The description of a group's current snapshot.
pub const SNAPSHOT_RECORD: Format = Format {
    what: "snapshot record",
    version: 1,
};
/// A partition state machine's state (log bounds, consumer group positions, and since
/// version 2 the idempotent producers and the dedup window's first offset; since version 3
/// each group position's parked keys; since version 4 each group position's isolation budget
/// and whether it is detached).
pub const PARTITION_STATE: Format = Format {
    what: "partition state",
    version: 4,
};
/// The metadata state machine's state (since version 2 with each station's exactly-once
/// settings and the producer id registry; since version 3 with API keys; since version 4
/// with tenants' quotas; since version 5 with the schema registry; since version 6 with each
/// group's lanes and each member's epoch; since version 7 with the replica moves and node
/// removals in progress; since version 8 with the cluster's format level).
pub const META_STATE: Format = Format {
    what: "metadata state",
    version: 8,
};
/// One stored message. Version 2 adds a CRC32C of the record's bytes (see
/// [`encode_record`]); version 1 records (written before) are still read, unchecked.
pub const RECORD: Format = Format {
    what: "stored record",
    version: 2,
};
/// The first log index a partition's stored messages point to (see
/// [`junction_storage::pointer`]), kept in its state machine's `sm_meta`.
pub const POINTERS_FROM: Format = Format {
    what: "message pointers floor",
    version: 1,
};
/// Peer payload: an AppendEntries request.
pub const APPEND_ENTRIES: Format = Format {
    what: "append entries",
    version: 1,
};
/// Peer payload: a Vote or PreVote request.
pub const VOTE_REQUEST: Format = Format {
    what: "vote request",
    version: 1,
};
/// Peer payload: a TransferLeader request.
pub const TRANSFER_LEADER: Format = Format {
    what: "transfer leader",
    version: 1,
};
/// Peer payload: the metadata of a snapshot being sent.
pub const SNAPSHOT_META: Format = Format {
    what: "snapshot meta",
    version: 1,
};
/// Peer payload: the reply to AppendEntries.
pub const APPEND_REPLY: Format = Format {
    what: "append entries reply",
    version: 1,
};
/// Peer payload: the reply to Vote or PreVote.
pub const VOTE_REPLY: Format = Format {
    what: "vote reply",
    version: 1,
};
/// Peer payload: the reply to TransferLeader.
pub const TRANSFER_REPLY: Format = Format {
    what: "transfer leader reply",
    version: 1,
};
/// Peer payload: the reply to InstallSnapshot.
pub const SNAPSHOT_REPLY: Format = Format {
    what: "snapshot reply",
    version: 1,
};

/// Encodes `v` as `format`: the version byte, then postcard.
pub fn encode<T: Serialize + ?Sized>(format: &Format, v: &T) -> Result<Vec<u8>, RaftStoreError> {
    let encode_error = |source| RaftStoreError::Encode {
        what: format.what,
        source,
    };
    // Sized first (a cheap pass that copies nothing): growing the vector as it fills copied
    // big entries about twice over.
    let size = postcard::experimental::serialized_size(v).map_err(encode_error)?;
    let mut out = Vec::with_capacity(size + 1);
    out.push(format.version);
    postcard::to_extend(v, out).map_err(encode_error)
}

/// Decodes bytes written by [`encode`] with `format`; never panics on bad bytes, never turns
/// unreadable bytes into a default.
pub fn decode<T: DeserializeOwned>(format: &Format, b: &[u8]) -> Result<T, RaftStoreError> {
    decode_upgrading(format, b, |_, _| None)
}

/// Like [`decode`], for a structure whose older versions are still read: `older(version,
/// body)` decodes and upgrades the body of an older version it knows, or returns `None` for
/// a version it does not (refused like any unknown version).
pub fn decode_upgrading<T: DeserializeOwned>(
    format: &Format,
    b: &[u8],
    older: impl FnOnce(u8, &[u8]) -> Option<Result<T, RaftStoreError>>,
) -> Result<T, RaftStoreError> {
    let Some((&version, body)) = b.split_first() else {
        return Err(RaftStoreError::Format {
            what: format.what,
            detail: "no bytes at all".to_owned(),
        });
    };
    if version != format.version {
        return match (version < format.version)
            .then(|| older(version, body))
            .flatten()
        {
            Some(v) => v,
            None => Err(RaftStoreError::Version {
                what: format.what,
                found: version,
                supported: format.version,
            }),
        };
    }
    decode_body(format, body)
}

/// Decodes the postcard body of (any version of) `format`.
pub fn decode_body<T: DeserializeOwned>(format: &Format, body: &[u8]) -> Result<T, RaftStoreError> {
    postcard::from_bytes(body).map_err(|source| RaftStoreError::Decode {
        what: format.what,
        source,
    })
}

/// Encodes `v` as the checksummed current version of `format`: the version byte, the
/// CRC32C (Castagnoli, little-endian) of the postcard body, then the body.
fn encode_checked<T: Serialize + ?Sized>(
    format: &Format,
    v: &T,
) -> Result<Vec<u8>, RaftStoreError> {
    let encode_error = |source| RaftStoreError::Encode {
        what: format.what,
        source,
    };
    let size = postcard::experimental::serialized_size(v).map_err(encode_error)?;
    let mut out = Vec::with_capacity(size + 5);
    out.extend_from_slice(&[format.version, 0, 0, 0, 0]);
    let mut out = postcard::to_extend(v, out).map_err(encode_error)?;
    let crc = crc32c::crc32c(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// The body of bytes written by [`encode_checked`] whose CRC32C matches, or of a version 1
/// value of `format` (which has none). A checksum that does not match is
/// [`RaftStoreError::Corrupt`]; a newer version is refused.
fn check_checked<'a>(format: &Format, b: &'a [u8]) -> Result<&'a [u8], RaftStoreError> {
    body_of_checked(format, b, true)
}

/// The body of bytes written by [`encode_checked`] (or of a version 1 value), its checksum
/// compared when `verify`.
fn body_of_checked<'a>(
    format: &Format,
    b: &'a [u8],
    verify: bool,
) -> Result<&'a [u8], RaftStoreError> {
    match b.split_first() {
        Some((&v, rest)) if v == format.version => {
            let Some((crc, body)) = rest.split_first_chunk::<4>() else {
                return Err(RaftStoreError::Corrupt {
                    what: format.what,
                    detail: format!("{} bytes, too short for a checksum", b.len()),
                });
            };
            if !verify {
                return Ok(body);
            }
            let stored = u32::from_le_bytes(*crc);
            let computed = crc32c::crc32c(body);
            if stored == computed {
                Ok(body)
            } else {
                Err(RaftStoreError::Corrupt {
                    what: format.what,
                    detail: format!(
                        "checksum mismatch (stored {stored:08x}, computed {computed:08x} over \
                         {} bytes)",
                        body.len()
                    ),
                })
            }
        }
        Some((1, body)) => Ok(body),
        Some((&found, _)) => Err(RaftStoreError::Version {
            what: format.what,
            found,
            supported: format.version,
        }),
        None => Err(RaftStoreError::Format {
            what: format.what,
            detail: "no bytes at all".to_owned(),
        }),
    }
}

/// Encodes a stored message as [`RECORD`] version 2: the version byte, the CRC32C of the
/// postcard body, then the body. Every replica computes it when it applies the entry, so a
/// record that changes on disk afterwards (a flipped bit, a zeroed block) no longer matches
/// and is never served as if it were intact.
pub fn encode_record(r: &junction_types::StoredRecord) -> Result<Vec<u8>, RaftStoreError> {
    encode_checked(&RECORD, r)
}

/// Encodes `record` stored with `timestamp_ms` like [`encode_record`] does the
/// [`junction_types::StoredRecord`] it would become, without building one.
pub fn encode_record_of(
    timestamp_ms: i64,
    record: &junction_types::Record,
) -> Result<Vec<u8>, RaftStoreError> {
    encode_record_ref(&junction_types::StoredRecordRef::of(timestamp_ms, record))
}

/// Encodes a borrowed stored message like [`encode_record`] does the owned one.
pub fn encode_record_ref(
    r: &junction_types::StoredRecordRef<'_>,
) -> Result<Vec<u8>, RaftStoreError> {
    encode_checked(&RECORD, r)
}

/// The body of a log entry read out of a segment frame whose CRC32C matched: that checksum
/// covers exactly these bytes, so the entry's own is not computed a second time. The version
/// is still checked (a newer one is refused, a version 1 entry has no checksum).
pub(crate) fn log_entry_body_of_checked_frame(b: &[u8]) -> Result<&[u8], RaftStoreError> {
    body_of_checked(&LOG_ENTRY, b, false)
}

/// Checks a stored message's checksum without decoding it: the body of a version 2 record
/// whose CRC32C matches, or of a version 1 record (which has none). A checksum that does not
/// match is [`RaftStoreError::Corrupt`]; a newer version is refused.
pub fn check_record(b: &[u8]) -> Result<&[u8], RaftStoreError> {
    check_checked(&RECORD, b)
}

/// Encodes a Raft log entry as [`LOG_ENTRY`] version 2 (checksummed like a record), as a
/// node appends it to its log: an entry whose bytes change on disk before (or after) it is
/// applied is refused when read, never applied or sent to another node.
pub fn encode_log_entry(e: &crate::types::Entry) -> Result<Vec<u8>, RaftStoreError> {
    encode_checked(&LOG_ENTRY, e)
}

/// Decodes a log entry written by [`encode_log_entry`] (or an unchecked version 1 one).
pub fn decode_log_entry(b: &[u8]) -> Result<crate::types::Entry, RaftStoreError> {
    decode_body(&LOG_ENTRY, check_checked(&LOG_ENTRY, b)?)
}

/// Decodes a log entry read out of a segment frame whose checksum matched, like
/// [`decode_log_entry`] without computing the entry's own checksum a second time (see
/// [`log_entry_body_of_checked_frame`]).
pub fn decode_log_entry_of_checked_frame(b: &[u8]) -> Result<crate::types::Entry, RaftStoreError> {
    decode_body(&LOG_ENTRY, log_entry_body_of_checked_frame(b)?)
}

/// Decodes a stored message written by [`encode_record`] (or an unchecked version 1 one).
/// A checksum that does not match is [`RaftStoreError::Corrupt`], never a record.
pub fn decode_record(b: &[u8]) -> Result<junction_types::StoredRecord, RaftStoreError> {
    decode_body(&RECORD, check_record(b)?)
}

/// Decodes a stored message like [`decode_record`] without copying anything: the byte fields
/// of the answer borrow from `b`.
pub fn decode_record_ref(b: &[u8]) -> Result<junction_types::StoredRecordRef<'_>, RaftStoreError> {
    let body = check_record(b)?;
    postcard::from_bytes(body).map_err(|source| RaftStoreError::Decode {
        what: RECORD.what,
        source,
    })
}

/// Decodes the metadata state, upgrading versions 1 to 7.
pub fn decode_meta_state(b: &[u8]) -> Result<junction_types::MetaState, RaftStoreError> {
    use junction_types::meta::{v1, v2, v3, v4, v5, v6, v7};
    decode_upgrading(&META_STATE, b, |version, body| match version {
        1 => Some(decode_body::<v1::MetaStateV1>(&META_STATE, body).map(Into::into)),
        2 => Some(decode_body::<v2::MetaStateV2>(&META_STATE, body).map(Into::into)),
        3 => Some(decode_body::<v3::MetaStateV3>(&META_STATE, body).map(Into::into)),
        4 => Some(decode_body::<v4::MetaStateV4>(&META_STATE, body).map(Into::into)),
        5 => Some(decode_body::<v5::MetaStateV5>(&META_STATE, body).map(Into::into)),
        6 => Some(decode_body::<v6::MetaStateV6>(&META_STATE, body).map(Into::into)),
        7 => Some(decode_body::<v7::MetaStateV7>(&META_STATE, body).map(Into::into)),
        _ => None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    //! Frozen bytes: the version 1 encoding of a sample of every structure, checked in. A
    //! failure here means the bytes of a structure changed: bump its version in this file and
    //! keep reading the old bytes (add them as a new case), or say why old bytes may be
    //! refused.

    use std::collections::{BTreeMap, BTreeSet};
    use std::fmt::Debug;

    use junction_types::groups::GroupCursors;
    use junction_types::meta::MetaState;
    use junction_types::{Command, CommandResponse, MetaCommand, StoredRecord};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
        VoteRequest, VoteResponse,
    };
    use openraft::{EntryPayload, Membership};

    use super::*;
    use crate::types::{Entry, LogId, SnapshotMeta, StoredMembership, TypeConfig, Vote};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Metadata state as version 6 wrote it (`v6`, frozen): still read, as `sample`; read
    /// as version 7 wrote it (the same bytes followed by an empty [`Reconfig`]: no moves, no
    /// draining nodes, no rebalance); and written as version 8 — the version 7 bytes
    /// followed by format level 1.
    ///
    /// [`Reconfig`]: junction_types::meta::Reconfig
    fn frozen_meta_v6(sample: &MetaState, v6: &str) {
        let v6 = v6.replace(char::is_whitespace, "");
        assert_eq!(
            &decode_meta_state(&unhex(&v6)).unwrap(),
            sample,
            "version 6 bytes read"
        );
        assert!(v6.starts_with("06"));
        let v7 = format!("07{}000000", &v6[2..]);
        assert_eq!(
            &decode_meta_state(&unhex(&v7)).unwrap(),
            sample,
            "version 7 bytes read"
        );
        frozen(&META_STATE, sample, &format!("08{}01", &v7[2..]));
    }

    /// The sample encodes to `frozen`, and `frozen` decodes to a value that prints like the
    /// sample and encodes to the same bytes again.
    fn frozen<T: Serialize + DeserializeOwned + Debug>(format: &Format, sample: &T, frozen: &str) {
        if *format == LOG_ENTRY {
            return frozen_checked_v1(format, sample, frozen);
        }
        let bytes = encode(format, sample).unwrap();
        assert_eq!(
            hex(&bytes),
            frozen,
            "the bytes of {} changed: bump its version (see the module doc)",
            format.what
        );
        let back: T = decode(format, &unhex(frozen)).unwrap();
        assert_eq!(
            format!("{back:?}"),
            format!("{sample:?}"),
            "{}",
            format.what
        );
        assert_eq!(hex(&encode(format, &back).unwrap()), frozen);
    }

    /// A checksummed structure (log entries): `v1` (frozen, version 1, no checksum) is still
    /// read as `sample`, and the current version writes the same body after its version byte
    /// and the body's CRC32C.
    fn frozen_checked_v1<T: Serialize + DeserializeOwned + Debug>(
        format: &Format,
        sample: &T,
        v1: &str,
    ) {
        let v1 = unhex(v1);
        assert_eq!(v1[0], 1, "frozen {} bytes are version 1", format.what);
        let back: T = decode_body(format, check_checked(format, &v1).unwrap()).unwrap();
        assert_eq!(
            format!("{back:?}"),
            format!("{sample:?}"),
            "{}",
            format.what
        );
        let now = encode_checked(format, sample).unwrap();
        assert_eq!(now[0], format.version);
        assert_eq!(
            hex(&now[5..]),
            hex(&v1[1..]),
            "the bytes of {} changed: bump its version (see the module doc)",
            format.what
        );
        assert_eq!(
            u32::from_le_bytes([now[1], now[2], now[3], now[4]]),
            crc32c::crc32c(&v1[1..])
        );
    }

    fn log_id(term: u64, node: u64, index: u64) -> LogId {
        openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term,
                node_id: node,
            },
            index,
        )
    }

    fn membership() -> StoredMembership {
        let nodes: BTreeMap<u64, openraft::BasicNode> = [
            (1, openraft::BasicNode::new("10.0.0.1:7701")),
            (2, openraft::BasicNode::new("10.0.0.2:7701")),
        ]
        .into_iter()
        .collect();
        let m = Membership::new(vec![BTreeSet::from([1, 2])], nodes).unwrap();
        StoredMembership::new(Some(log_id(2, 1, 7)), m)
    }

    fn record() -> StoredRecord {
        StoredRecord {
            timestamp_ms: 1_700_000_000_000,
            key: Some(b"alice".to_vec()),
            headers: vec![("h".into(), b"v".to_vec())],
            payload: b"hello".to_vec(),
        }
    }

    /// Version 1 of a stored record (no checksum), still read; version 2 with its CRC32C
    /// (0x3a1b12e4 over the body, computed here by an independent bitwise implementation
    /// when these bytes were pinned).
    const RECORD_V1: &str = "0180a0abfef9620105616c69636501016801760568656c6c6f";
    const RECORD_V2: &str = "02e4121b3a80a0abfef9620105616c69636501016801760568656c6c6f";

    #[test]
    fn stored_records_carry_a_checksum_and_old_ones_are_still_read() {
        assert_eq!(hex(&encode_record(&record()).unwrap()), RECORD_V2);
        let r = record();
        let unstored = junction_types::Record {
            key: r.key,
            headers: r.headers,
            payload: r.payload,
        };
        assert_eq!(
            hex(&encode_record_of(r.timestamp_ms, &unstored).unwrap()),
            RECORD_V2,
            "a resolved pointer encodes as the copy"
        );
        assert_eq!(decode_record(&unhex(RECORD_V2)).unwrap(), record());
        assert_eq!(decode_record(&unhex(RECORD_V1)).unwrap(), record());
        // The borrowed decode reads both versions alike.
        for frozen in [RECORD_V1, RECORD_V2] {
            let bytes = unhex(frozen);
            let view = decode_record_ref(&bytes).unwrap();
            assert_eq!(
                (view.timestamp_ms, view.key, view.headers, view.payload),
                (
                    1_700_000_000_000,
                    Some(&b"alice"[..]),
                    vec![("h", &b"v"[..])],
                    &b"hello"[..]
                )
            );
        }
        // The check value of CRC32C (RFC 3720): the crate computes Castagnoli.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn a_changed_record_fails_its_checksum() {
        let good = unhex(RECORD_V2);
        // Every single-bit flip anywhere after the version byte is caught.
        for byte in 1..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                match decode_record(&bad) {
                    Err(RaftStoreError::Corrupt { what, detail }) => {
                        assert_eq!(what, "stored record");
                        assert!(detail.contains("checksum mismatch"), "{detail}");
                    }
                    other => panic!("flip of bit {bit} in byte {byte}: {other:?}"),
                }
                assert!(
                    matches!(decode_record_ref(&bad), Err(RaftStoreError::Corrupt { .. })),
                    "the borrowed decode checks the checksum too"
                );
            }
        }
        // Truncated to no room for the checksum, and a zeroed block.
        assert!(matches!(
            decode_record(&good[..3]),
            Err(RaftStoreError::Corrupt { .. })
        ));
        let mut zeroed = good.clone();
        zeroed[5..15].fill(0);
        assert!(matches!(
            decode_record(&zeroed),
            Err(RaftStoreError::Corrupt { .. })
        ));
        // A newer version is refused, naming both.
        let mut newer = good;
        newer[0] = 3;
        let e = decode_record(&newer).unwrap_err().to_string();
        assert!(e.contains("version 3") && e.contains("version 2"), "{e}");
    }

    #[test]
    fn an_unknown_version_is_refused_with_both_versions_named() {
        let mut bytes = encode(&META_STATE, &MetaState::default()).unwrap();
        bytes[0] = 9;
        let err = decode_meta_state(&bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "metadata state is in format version 9; this build reads version 8 (written by a \
             newer Junction?)"
        );
        bytes[0] = 0;
        assert!(decode_meta_state(&bytes).is_err());
        assert!(decode::<MetaState>(&META_STATE, &[]).is_err());
        assert!(decode::<Vote>(&VOTE, &[1, 0xff]).is_err());
    }

    /// Replica moves: the metadata commands that remove a node and move replicas, and the
    /// state (version 7) that holds a move, a draining node and a running rebalance.
    #[test]
    fn frozen_replica_moves() {
        let commands = [
            (MetaCommand::DrainNode { node: 4 }, "0104011e01001404"),
            (
                MetaCommand::StartMoves {
                    moves: vec![(1, vec![2, 3, 5])],
                },
                "0104011f010015010103020305",
            ),
            (
                MetaCommand::FinishMove {
                    group: 1,
                    replicas: vec![2, 3, 5],
                },
                "010401200100160103020305",
            ),
            (MetaCommand::ForgetNode { node: 4 }, "0104012101001704"),
            (MetaCommand::SetRebalancing { on: true }, "0104012201001801"),
        ];
        for (i, (cmd, bytes)) in commands.into_iter().enumerate() {
            frozen(
                &LOG_ENTRY,
                &Entry {
                    log_id: log_id(4, 1, 30 + i as u64),
                    payload: EntryPayload::Normal(Command::Meta(cmd)),
                },
                bytes,
            );
        }
        let mut state = MetaState::default();
        state.apply(&MetaCommand::CreateStation {
            tenant: "default".into(),
            name: "s".into(),
            placement: vec![vec![2, 3, 4]],
            replication_factor: 3,
            max_message_bytes: 1024,
            now_ms: 1,
            policy: Default::default(),
        });
        state.apply(&MetaCommand::DrainNode { node: 4 });
        state.apply(&MetaCommand::StartMoves {
            moves: vec![(1, vec![2, 3, 5])],
        });
        state.apply(&MetaCommand::SetRebalancing { on: true });
        assert_eq!(state.reconfig.moves.len(), 1);
        let v7 = "07010764656661756c7400010964656661756c742f730764656661756c740173038008020101030203040000000000000080b8992900c0843d8088b2a002020001010000000000000000010103020305010401";
        assert_eq!(
            decode_meta_state(&unhex(v7)).unwrap(),
            state,
            "version 7 read"
        );
        frozen(&META_STATE, &state, &format!("08{}01", &v7[2..]));
    }

    /// Format levels: the command that raises the level, a metadata state at level 2, and a
    /// partition append carrying its leader's checksum.
    #[test]
    fn frozen_format_levels() {
        frozen(
            &LOG_ENTRY,
            &Entry {
                log_id: log_id(5, 1, 40),
                payload: EntryPayload::Normal(Command::Meta(MetaCommand::RaiseFormatLevel {
                    level: 2,
                })),
            },
            "0105012801001902",
        );
        let mut state = MetaState::default();
        state.apply(&MetaCommand::RaiseFormatLevel { level: 2 });
        frozen(
            &META_STATE,
            &state,
            "08010764656661756c74000001000101000000000000000000000002",
        );
        let append = junction_types::PartitionCommand::Append {
            timestamp_ms: 1_700_000_000_000,
            records: vec![junction_types::Record {
                key: Some(b"k".to_vec()),
                headers: vec![("h".into(), b"v".to_vec())],
                payload: b"hello".to_vec(),
            }],
        };
        let checked = append.checked();
        assert_eq!(checked.check(), Ok(()));
        frozen(
            &LOG_ENTRY,
            &Entry {
                log_id: log_id(5, 1, 41),
                payload: EntryPayload::Normal(Command::Partition(checked)),
            },
            "0105012901010dbed684dc090080a0abfef9620101016b01016801760568656c6c6f",
        );
    }

    /// Groups: the commands that create a key-shared group and join it, the state that holds
    /// it (version 6), and a partitioned group's version 5 bytes, still read.
    #[test]
    fn frozen_group_lanes() {
        use junction_types::groups::{GroupMode, GroupSettings, Lanes};
        let lanes = Lanes {
            mode: GroupMode::KeyShared,
            max_in_flight_per_key: 2,
            ..Lanes::default()
        };
        let create = Entry {
            log_id: log_id(3, 1, 20),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::CreateGroupV2 {
                station: "default/s".into(),
                group: "g".into(),
                settings: GroupSettings::default(),
                lanes,
                now_ms: 5,
            })),
        };
        frozen(
            &LOG_ENTRY,
            &create,
            "010301140100120964656661756c742f73016700b0ea0105e807904e0102000a",
        );
        let join = MetaCommand::JoinGroupV2 {
            station: "default/s".into(),
            group: "g".into(),
            member: "m1".into(),
            client: "host".into(),
            settings: GroupSettings::default(),
            lanes,
            now_ms: 6,
        };
        frozen(
            &LOG_ENTRY,
            &Entry {
                log_id: log_id(3, 1, 21),
                payload: EntryPayload::Normal(Command::Meta(join.clone())),
            },
            "010301150100130964656661756c742f730167026d3104686f737400b0ea0105e807904e0102\
             000c",
        );
        let mut state = MetaState::default();
        state.apply(&MetaCommand::CreateStation {
            tenant: "default".into(),
            name: "s".into(),
            placement: vec![vec![1]],
            replication_factor: 1,
            max_message_bytes: 1024,
            now_ms: 1,
            policy: Default::default(),
        });
        let CommandResponse::Group(g) = state.apply(&join) else {
            panic!("no group")
        };
        assert_eq!(g.partitions_of("m1"), vec![(0, 1)]);
        frozen_meta_v6(
            &state,
            "06010764656661756c7400010964656661756c742f730764656661756c740173018008020101\
             01010000000000000080b8992900c0843d8088b2a00202010964656661756c742f7301670964\
             656661756c742f7301670100b0ea0105e807904e0c0101026d3104686f73740c010100010200\
             02010000000000000000",
        );
        // A partitioned group as version 5 stored it: its members get the generation as epoch.
        let mut old = MetaState::default();
        old.apply(&MetaCommand::CreateStation {
            tenant: "default".into(),
            name: "s".into(),
            placement: vec![vec![1]],
            replication_factor: 1,
            max_message_bytes: 1024,
            now_ms: 1,
            policy: Default::default(),
        });
        old.apply(&MetaCommand::JoinGroup {
            station: "default/s".into(),
            group: "g".into(),
            member: "m1".into(),
            client: "host".into(),
            settings: GroupSettings::default(),
            now_ms: 6,
        });
        let upgraded = decode_meta_state(&unhex(
            "05010764656661756c7400010964656661756c742f730764656661756c740173018008020101\
             01010000000000000080b8992900c0843d8088b2a00202010964656661756c742f7301670964\
             656661756c742f7301670100b0ea0105e807904e0c0101026d3104686f73740c0101026d3101\
             02010000000000000000",
        ))
        .unwrap();
        assert_eq!(upgraded, old);
        let g = upgraded.group("default/s", "g").unwrap();
        assert_eq!(g.lanes, Lanes::default());
        assert_eq!(g.partitions_of("m1"), vec![(0, 1)]);
    }

    #[test]
    fn frozen_persisted_formats() {
        frozen(&LOG_ID, &log_id(3, 2, 41), "01030229");
        frozen(&VOTE, &Vote::new_committed(3, 2), "01030201");
        frozen(
            &MEMBERSHIP,
            &membership(),
            "01010201070102010202010d31302e302e302e313a37373031020d31302e302e302e323a37373031",
        );
        let entry = Entry {
            log_id: log_id(3, 1, 9),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::CreateTenant {
                name: "acme".into(),
                now_ms: 1_700_000_000_000,
            })),
        };
        frozen(&LOG_ENTRY, &entry, "010301090100000461636d6580a0abfef962");
        // Entries of the exactly-once commands (new variants: earlier entries keep their bytes).
        let append = Entry {
            log_id: log_id(3, 1, 10),
            payload: EntryPayload::Normal(Command::Partition(
                junction_types::PartitionCommand::AppendBatches {
                    timestamp_ms: 1_700_000_000_000,
                    delivery: junction_types::exactly_once::DeliveryPolicy {
                        dedup_window_ms: Some(120_000),
                        dedup_max_ids: 1000,
                        producer_expiry_ms: 60_000,
                    },
                    batches: vec![junction_types::command::AppendBatch {
                        producer: Some(junction_types::exactly_once::ProducerBatch {
                            id: 7,
                            epoch: 1,
                            base_sequence: 40,
                        }),
                        records: vec![junction_types::Record {
                            key: Some(b"k".to_vec()),
                            headers: vec![("junction-msg-id".into(), b"m1".to_vec())],
                            payload: b"p".to_vec(),
                        }],
                    }],
                },
            )),
        };
        frozen(
            &LOG_ENTRY,
            &append,
            "0103010a01010980a0abfef96201c0a907e807e0d40301010701280101016b010f6a756e6374696f6e\
             2d6d73672d6964026d310170",
        );
        let init = Entry {
            log_id: log_id(3, 1, 11),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::InitProducer {
                tenant: "acme".into(),
                name: Some("orders".into()),
            })),
        };
        frozen(
            &LOG_ENTRY,
            &init,
            "0103010b0100080461636d6501066f7264657273",
        );
        let mut meta = MetaState::default();
        meta.apply(&MetaCommand::InitProducer {
            tenant: "default".into(),
            name: Some("orders".into()),
        });
        frozen_meta_v6(
            &meta,
            "06010764656661756c7400000100018108010181080764656661756c74010764656661756c74\
             028108010764656661756c74066f72646572730100010100\
             00000000",
        );
        // Version 5 (before group lanes) is still read.
        assert_eq!(
            decode_meta_state(&unhex(
                "05010764656661756c7400000100018108010181080764656661756c74010764656661756c74\
                 028108010764656661756c74066f72646572730100010100\
                 00000000"
            ))
            .unwrap(),
            meta
        );
        // Version 4 (before schemas) is still read.
        assert_eq!(
            decode_meta_state(&unhex(
                "04010764656661756c7400000100018108010181080764656661756c74010764656661756c74\
                 028108010764656661756c74066f72646572730100010100\
                 0000"
            ))
            .unwrap(),
            meta
        );
        // Version 3 (before quotas) is still read.
        assert_eq!(
            decode_meta_state(&unhex(
                "03010764656661756c7400000100018108010181080764656661756c74010764656661756c74\
                 028108010764656661756c74066f72646572730100010100\
                 00"
            ))
            .unwrap(),
            meta
        );
        // Version 2 (before API keys) is still read.
        assert_eq!(
            decode_meta_state(&unhex(
                "02010764656661756c7400000100018108010181080764656661756c74010764656661756c74\
                 028108010764656661756c74066f72646572730100010100"
            ))
            .unwrap(),
            meta
        );
        // API keys: the command that adds one, and the state that holds it.
        let key = junction_types::auth::ApiKey {
            id: "0123456789abcdef".into(),
            tenant: "default".into(),
            role: junction_types::auth::Role::Producer,
            station_prefix: Some("orders".into()),
            secret_sha256: [0xab; 32],
            description: "ci".into(),
            created_ms: 1_764_000_000_000,
            expires_ms: None,
            revoked_ms: None,
        };
        let create_key = Entry {
            log_id: log_id(3, 1, 12),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::CreateApiKey {
                key: key.clone(),
            })),
        };
        frozen(
            &LOG_ENTRY,
            &create_key,
            "0103010c01000b10303132333435363738396162636465660764656661756c740101066f7264657273\
             abababababababababababababababababababababababababababababababab02636980a0bfe9d6660000",
        );
        let revoke_key = Entry {
            log_id: log_id(3, 1, 13),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::RevokeApiKey {
                id: key.id.clone(),
                tenant: Some("default".into()),
                now_ms: 1_764_000_000_500,
            })),
        };
        frozen(
            &LOG_ENTRY,
            &revoke_key,
            "0103010d01000c1030313233343536373839616263646566010764656661756c74e8a7bfe9d666",
        );
        let mut keyed = MetaState::default();
        keyed.apply(&MetaCommand::CreateApiKey { key });
        frozen_meta_v6(
            &keyed,
            "06010764656661756c7400000100010100000000011030313233343536373839616263646566\
             10303132333435363738396162636465660764656661756c740101066f7264657273\
             abababababababababababababababababababababababababababababababab02636980a0bfe9d6660000000000",
        );
        // Quotas: the command that sets some, and the state that holds them.
        let set_quota = Entry {
            log_id: log_id(3, 1, 14),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::SetQuota {
                tenant: "default".into(),
                change: junction_types::quota::QuotaChange {
                    station: None,
                    set: vec![
                        (
                            junction_types::quota::QuotaField::ProduceBytesPerSec,
                            1_000_000,
                        ),
                        (junction_types::quota::QuotaField::Stations, 4),
                    ],
                    clear: vec![junction_types::quota::QuotaField::Streams],
                },
            })),
        };
        frozen(
            &LOG_ENTRY,
            &set_quota,
            "0103010e01000d0764656661756c74000200c0843d04040106",
        );
        let mut limited = MetaState::default();
        let CommandResponse::Quotas(_) = limited.apply(&MetaCommand::SetQuota {
            tenant: "default".into(),
            change: junction_types::quota::QuotaChange {
                station: None,
                set: vec![(junction_types::quota::QuotaField::StoredBytes, 1 << 30)],
                clear: vec![],
            },
        }) else {
            panic!("quota not set")
        };
        frozen_meta_v6(
            &limited,
            "06010764656661756c740000010001010000000000010764656661756c7401038080808004000000",
        );
        // Schemas: the commands that register a version and bind a station, the entry of a
        // batch with dead-lettered messages, and the state that holds a schema.
        let register = Entry {
            log_id: log_id(3, 1, 15),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::RegisterSchema {
                version: junction_types::schema::NewVersion {
                    tenant: "default".into(),
                    name: "orders".into(),
                    kind: junction_types::schema::SchemaType::Json,
                    compatibility: junction_types::schema::Compatibility::Full,
                    text: "{}".into(),
                    message: None,
                    expected_latest: None,
                    now_ms: 1_764_000_000_000,
                },
            })),
        };
        frozen(
            &LOG_ENTRY,
            &register,
            "0103010f01000e0764656661756c74066f72646572730104027b7d000080a0bfe9d666",
        );
        let binding = junction_types::schema::SchemaBinding {
            schema: "orders".into(),
            version: Some(1),
            on_invalid: junction_types::schema::OnInvalid::DeadLetter,
        };
        let bind = Entry {
            log_id: log_id(3, 1, 16),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::BindSchema {
                station: "default/s".into(),
                binding: Some(binding.clone()),
            })),
        };
        frozen(
            &LOG_ENTRY,
            &bind,
            "010301100100110964656661756c742f7301066f7264657273010101",
        );
        let spanned = Entry {
            log_id: log_id(3, 1, 17),
            payload: EntryPayload::Normal(Command::Partition(
                junction_types::PartitionCommand::AppendSpanned {
                    timestamp_ms: 1_700_000_000_000,
                    delivery: junction_types::exactly_once::DeliveryPolicy::default(),
                    batches: vec![junction_types::command::SpannedBatch {
                        batch: junction_types::command::AppendBatch {
                            producer: Some(junction_types::exactly_once::ProducerBatch {
                                id: 7,
                                epoch: 1,
                                base_sequence: 40,
                            }),
                            records: vec![junction_types::Record {
                                key: None,
                                headers: vec![],
                                payload: b"p".to_vec(),
                            }],
                        },
                        sequence_span: 3,
                    }],
                },
            )),
        };
        frozen(
            &LOG_ENTRY,
            &spanned,
            "0103011101010a80a0abfef96200c0843d8088b2a0020101070128010000017003",
        );
        // A parked key (appended variant; partition state version 3).
        let park = Entry {
            log_id: log_id(3, 1, 18),
            payload: EntryPayload::Normal(Command::Partition(
                junction_types::PartitionCommand::GroupPark {
                    group: "audit".into(),
                    uid: 3,
                    key: b"k1".to_vec(),
                    head: Some(30),
                },
            )),
        };
        frozen(&LOG_ENTRY, &park, "0103011201010b05617564697403026b31011e");
        // A group's isolation change (appended variant; partition state version 4).
        let isolation = |change| Entry {
            log_id: log_id(3, 1, 19),
            payload: EntryPayload::Normal(Command::Partition(
                junction_types::PartitionCommand::GroupIsolation {
                    group: "audit".into(),
                    uid: 3,
                    change,
                },
            )),
        };
        use junction_types::groups::{Isolation, LagBudget};
        frozen(
            &LOG_ENTRY,
            &isolation(Isolation::Budget(LagBudget {
                max_messages: Some(1000),
                max_bytes: None,
                max_age_ms: Some(60_000),
            })),
            "0103011301010c056175646974030001e8070001e0d403",
        );
        frozen(
            &LOG_ENTRY,
            &isolation(Isolation::Detach {
                at_ms: 1_700_000_000_000,
            }),
            "0103011301010c056175646974030180a0abfef962",
        );
        frozen(
            &LOG_ENTRY,
            &isolation(Isolation::Reattach),
            "0103011301010c0561756469740302",
        );
        let mut schemas = MetaState::default();
        let Entry {
            payload: EntryPayload::Normal(Command::Meta(cmd)),
            ..
        } = register
        else {
            panic!("not a metadata command")
        };
        assert!(matches!(
            schemas.apply(&cmd),
            CommandResponse::SchemaRegistered(_)
        ));
        schemas.schemas.bindings.insert("default/s".into(), binding);
        frozen_meta_v6(
            &schemas,
            "06010764656661756c74000001000101000000000000010764656661756c74066f72646572730104010101027b7d0080a0bfe9d66602010964656661756c742f73066f7264657273010101",
        );
        // Version 1 (before producers and exactly-once settings) is still read.
        assert_eq!(
            decode_meta_state(&unhex("01010764656661756c740000010001")).unwrap(),
            MetaState::default()
        );
        // A partition's persisted state is its log state, then its groups' positions.
        let log = crate::partition_sm::PartitionState {
            next_offset: 120,
            start_offset: 20,
            last_timestamp_ms: 1_700_000_000_000,
            compacted_upto: 10,
            appended_bytes: 4096,
            ..Default::default()
        };
        let mut groups = GroupCursors::new();
        let mut cursor = junction_types::groups::GroupCursor::new(3, 20);
        cursor.ack(25);
        groups.insert("audit".into(), cursor);
        let mut producers = junction_types::exactly_once::ProducerTable::default();
        producers.record(
            &junction_types::exactly_once::ProducerBatch {
                id: 9,
                epoch: 2,
                base_sequence: 40,
            },
            3,
            junction_types::exactly_once::Placement {
                base_offset: 117,
                timestamp_ms: 1_700_000_000_000,
                dups: vec![(1, 100)],
            },
        );
        // Version 4: a group's position carries its parked keys (since version 3), its
        // isolation budget and whether it is detached.
        let mut parked = groups.clone();
        if let Some(c) = parked.get_mut("audit") {
            c.parked.insert(b"k1".to_vec(), 30);
        }
        let mut isolated = parked.clone();
        if let Some(c) = isolated.get_mut("audit") {
            c.budget.max_messages = Some(1000);
            c.detached_at_ms = Some(1_700_000_000_000);
        }
        frozen(
            &PARTITION_STATE,
            &(log, isolated, producers.clone(), 100u64),
            "04781480a0abfef9620a802000000001056175646974031401191a0001026b311e01e80700000180a0abfef96201090280a0abfef9620128037580a0abfef96201016464",
        );
        // Version 3 (parked keys, no isolation) is still read.
        {
            use junction_types::groups::cursor_v3::{GroupCursorsV3, upgrade};
            let v3 = unhex(
                "03781480a0abfef9620a802000000001056175646974031401191a0001026b311e\
                 01090280a0abfef9620128037580a0abfef96201016464",
            );
            let state3 = decode_upgrading(&PARTITION_STATE, &v3, |version, body| {
                (version == 3).then(|| {
                    decode_body::<(
                        crate::partition_sm::PartitionState,
                        GroupCursorsV3,
                        junction_types::exactly_once::ProducerTable,
                        u64,
                    )>(&PARTITION_STATE, body)
                    .map(|(l, g, p, d)| (l, upgrade(g), p, d))
                })
            })
            .unwrap();
            assert_eq!(state3, (log, parked, producers.clone(), 100u64));
        }
        // Version 2 (no parked keys) is still read.
        use junction_types::exactly_once::ProducerTable;
        use junction_types::groups::cursor_v2::{GroupCursorsV2, upgrade};
        let v2 = unhex(
            "02781480a0abfef9620a802000000001056175646974031401191a00\
             01090280a0abfef9620128037580a0abfef96201016464",
        );
        let state2 = decode_upgrading(&PARTITION_STATE, &v2, |version, body| {
            (version == 2).then(|| {
                decode_body::<(
                    crate::partition_sm::PartitionState,
                    GroupCursorsV2,
                    ProducerTable,
                    u64,
                )>(&PARTITION_STATE, body)
                .map(|(l, g, p, d)| (l, upgrade(g), p, d))
            })
        })
        .unwrap();
        assert_eq!(state2, (log, groups.clone(), producers, 100u64));
        // Version 1 (before producers and the dedup window) is still read.
        let v1 = unhex("01781480a0abfef9620a802000000001056175646974031401191a00");
        let (log1, groups1) = decode_upgrading(&PARTITION_STATE, &v1, |version, body| {
            (version == 1).then(|| {
                decode_body::<(crate::partition_sm::PartitionState, GroupCursorsV2)>(
                    &PARTITION_STATE,
                    body,
                )
                .map(|(l, g)| (l, upgrade(g)))
            })
        })
        .unwrap();
        assert_eq!((log1, groups1), (log, groups));
    }

    #[test]
    fn frozen_peer_payloads() {
        let vote = Vote::new_committed(3, 2);
        frozen(
            &VOTE_REQUEST,
            &VoteRequest::<TypeConfig>::new(vote, Some(log_id(3, 2, 41))),
            "010302010103022900",
        );
        frozen(
            &VOTE_REPLY,
            &VoteResponse::<TypeConfig>::new(vote, Some(log_id(3, 2, 41)), true),
            "010302010101030229",
        );
        frozen(
            &APPEND_ENTRIES,
            &AppendEntriesRequest::<TypeConfig> {
                vote,
                prev_log_id: Some(log_id(3, 2, 40)),
                entries: vec![Entry {
                    log_id: log_id(3, 2, 41),
                    payload: EntryPayload::Blank,
                }],
                leader_commit: Some(log_id(3, 2, 40)),
            },
            "0103020101030228010302290001030228",
        );
        frozen(
            &APPEND_REPLY,
            &AppendEntriesResponse::<TypeConfig>::Success,
            "0100",
        );
        frozen(
            &TRANSFER_LEADER,
            &TransferLeaderRequest::<TypeConfig>::new(vote, 3, Some(log_id(3, 2, 41))),
            "010302010301030229",
        );
        frozen(
            &SNAPSHOT_META,
            &SnapshotMeta {
                last_log_id: Some(log_id(3, 2, 41)),
                last_membership: membership(),
            },
            "0101030229010201070102010202010d31302e302e302e313a37373031020d31302e302e302e323a3737303100",
        );
        let transferred: openraft::raft::TransferLeaderResponse<TypeConfig> = Ok(());
        frozen(&TRANSFER_REPLY, &transferred, "0100");
        frozen(
            &SNAPSHOT_REPLY,
            &SnapshotResponse::<TypeConfig>::new(vote),
            "01030201",
        );
    }

    /// A log entry read from a checked frame gives the body the checked decode gives, without
    /// its checksum computed again; its version is still checked.
    #[test]
    fn an_entry_of_a_checked_frame_gives_its_body_and_keeps_its_version_check() {
        let entry = Entry {
            log_id: log_id(2, 1, 9),
            payload: EntryPayload::Normal(Command::Meta(MetaCommand::ForgetNode { node: 4 })),
        };
        let bytes = encode_log_entry(&entry).unwrap();
        let body = log_entry_body_of_checked_frame(&bytes).unwrap();
        assert_eq!(body, check_checked(&LOG_ENTRY, &bytes).unwrap());
        let back: Entry = decode_body(&LOG_ENTRY, body).unwrap();
        assert_eq!(back.log_id, entry.log_id);
        // Version 1 had no checksum: its body follows the version byte.
        let mut v1 = vec![1u8];
        v1.extend_from_slice(body);
        assert_eq!(log_entry_body_of_checked_frame(&v1).unwrap(), body);
        let mut newer = bytes.clone();
        newer[0] = LOG_ENTRY.version + 1;
        assert!(matches!(
            log_entry_body_of_checked_frame(&newer),
            Err(RaftStoreError::Version { .. })
        ));
        assert!(matches!(
            log_entry_body_of_checked_frame(&bytes[..3]),
            Err(RaftStoreError::Corrupt { .. })
        ));
        assert!(matches!(
            log_entry_body_of_checked_frame(&[]),
            Err(RaftStoreError::Format { .. })
        ));
    }
}
