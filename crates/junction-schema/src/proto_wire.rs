//! Protobuf validation by walking the wire format against the message's descriptor, without
//! building the message: every field must be one the schema defines, with a wire type its
//! type allows (a repeated scalar also packed), lengths within the payload, strings UTF-8 and
//! nested messages valid in turn. It accepts exactly what decoding into a `DynamicMessage`
//! and refusing unknown fields accepts (a differential test checks this), at a fraction of
//! the cost: nothing is allocated unless the payload is invalid.
//!
//! Schemas with proto2 groups are validated by decoding (see `proto::Compiled`).

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};

use crate::Invalid;

/// Why a walk stopped.
pub(crate) enum Stop {
    /// Not a Protobuf encoding of the message at all.
    Malformed(String),
    /// A well-formed payload that breaks the schema at `path` (innermost segment first).
    Breaks { path: Vec<String>, rule: String },
}

impl Stop {
    pub(crate) fn into_invalid(self, root: &MessageDescriptor) -> Invalid {
        match self {
            Stop::Malformed(detail) => Invalid::whole(format!(
                "not a valid {} message: {detail}",
                root.full_name()
            )),
            Stop::Breaks { mut path, rule } => {
                path.reverse();
                let mut joined = String::new();
                for seg in path {
                    if !joined.is_empty() && !seg.starts_with('[') {
                        joined.push('.');
                    }
                    joined.push_str(&seg);
                }
                Invalid { path: joined, rule }
            }
        }
    }

    /// Adds the segment the walk was in when it stopped.
    fn within(self, segment: impl FnOnce() -> String) -> Stop {
        match self {
            Stop::Breaks { mut path, rule } => {
                path.push(segment());
                Stop::Breaks { path, rule }
            }
            m => m,
        }
    }
}

const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const START_GROUP: u64 = 3;
const END_GROUP: u64 = 4;
const FIXED32: u64 = 5;

/// Reads a base-128 varint as Protobuf does: at most 10 bytes, the 10th at most 1.
fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, Stop> {
    let mut v = 0u64;
    for i in 0..10 {
        let Some(&b) = buf.get(*pos) else {
            return Err(Stop::Malformed("the payload ends inside a varint".into()));
        };
        *pos += 1;
        if i == 9 && b >= 0x02 {
            return Err(Stop::Malformed("a varint longer than 64 bits".into()));
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(Stop::Malformed("a varint longer than 10 bytes".into()))
}

/// Takes `n` bytes at `pos`.
fn take<'a>(buf: &'a [u8], pos: &mut usize, n: u64) -> Result<&'a [u8], Stop> {
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| pos.checked_add(n))
        .filter(|end| *end <= buf.len())
        .ok_or_else(|| Stop::Malformed("a length runs past the end of the payload".into()))?;
    let out = &buf[*pos..end];
    *pos = end;
    Ok(out)
}

/// The wire type a single value of `kind` is written with.
fn wire_type(kind: &Kind) -> u64 {
    match kind {
        Kind::Double | Kind::Fixed64 | Kind::Sfixed64 => FIXED64,
        Kind::Float | Kind::Fixed32 | Kind::Sfixed32 => FIXED32,
        Kind::String | Kind::Bytes | Kind::Message(_) => LEN,
        Kind::Int32
        | Kind::Int64
        | Kind::Uint32
        | Kind::Uint64
        | Kind::Sint32
        | Kind::Sint64
        | Kind::Bool
        | Kind::Enum(_) => VARINT,
    }
}

/// Whether every message reachable from `root` can be walked (no proto2 groups).
pub(crate) fn walkable(root: &MessageDescriptor) -> bool {
    let mut seen = std::collections::HashSet::new();
    let mut todo = vec![root.clone()];
    while let Some(m) = todo.pop() {
        if !seen.insert(m.full_name().to_owned()) {
            continue;
        }
        for f in m.fields() {
            if f.is_group() {
                return false;
            }
            if let Kind::Message(inner) = f.kind() {
                todo.push(inner);
            }
        }
    }
    true
}

/// Walks `buf` as message `desc`, `depth` levels down.
pub(crate) fn walk(
    desc: &MessageDescriptor,
    buf: &[u8],
    depth: usize,
    max_depth: usize,
) -> Result<(), Stop> {
    if depth > max_depth {
        return Err(Stop::Breaks {
            path: vec![],
            rule: format!("nested deeper than {max_depth} levels"),
        });
    }
    let map_entry = desc.is_map_entry();
    // Occurrences so far of repeated message fields (for the index in an error's path).
    let mut seen: Vec<(u32, usize)> = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        if key > u64::from(u32::MAX) {
            return Err(Stop::Malformed(format!("invalid field key {key}")));
        }
        let (number, wire) = ((key >> 3) as u32, key & 7);
        if number == 0 {
            return Err(Stop::Malformed("field number 0".into()));
        }
        if wire > FIXED32 {
            return Err(Stop::Malformed(format!("invalid wire type {wire}")));
        }
        let Some(field) = desc.get_field(number) else {
            if map_entry {
                // A map entry's other fields are skipped, as decoders do.
                skip(buf, &mut pos, wire)?;
                continue;
            }
            return Err(Stop::Breaks {
                path: vec![],
                rule: format!(
                    "field number {number} is not in the schema of {}",
                    desc.full_name()
                ),
            });
        };
        value(&field, buf, &mut pos, wire, depth, max_depth, &mut seen)?;
    }
    Ok(())
}

/// Checks one field's value at `pos` (after its key).
fn value(
    field: &FieldDescriptor,
    buf: &[u8],
    pos: &mut usize,
    wire: u64,
    depth: usize,
    max_depth: usize,
    seen: &mut Vec<(u32, usize)>,
) -> Result<(), Stop> {
    let kind = field.kind();
    let single = wire_type(&kind);
    if wire == single {
        return match (single, &kind) {
            (VARINT, _) => varint(buf, pos).map(drop),
            (FIXED64, _) => take(buf, pos, 8).map(drop),
            (FIXED32, _) => take(buf, pos, 4).map(drop),
            (_, Kind::String) => {
                let len = varint(buf, pos)?;
                std::str::from_utf8(take(buf, pos, len)?)
                    .map(drop)
                    .map_err(|_| Stop::Malformed(format!("field {} is not UTF-8", field.name())))
            }
            (_, Kind::Message(inner)) => {
                let len = varint(buf, pos)?;
                let body = take(buf, pos, len)?;
                let index = if field.is_list() || field.is_map() {
                    let n = field.number();
                    match seen.iter_mut().find(|(f, _)| *f == n) {
                        Some((_, c)) => {
                            *c += 1;
                            Some(*c)
                        }
                        None => {
                            seen.push((n, 0));
                            Some(0)
                        }
                    }
                } else {
                    None
                };
                walk(inner, body, depth + 1, max_depth).map_err(|s| {
                    s.within(|| match index {
                        Some(i) => format!("{}[{i}]", field.name()),
                        None => field.name().to_owned(),
                    })
                })
            }
            _ => {
                // Bytes.
                let len = varint(buf, pos)?;
                take(buf, pos, len).map(drop)
            }
        };
    }
    if wire == LEN && field.is_list() && single != LEN {
        // A packed run of scalars.
        let len = varint(buf, pos)?;
        let run = take(buf, pos, len)?;
        return match single {
            VARINT => {
                let mut p = 0;
                while p < run.len() {
                    varint(run, &mut p)?;
                }
                Ok(())
            }
            FIXED64 if run.len() % 8 == 0 => Ok(()),
            FIXED32 if run.len() % 4 == 0 => Ok(()),
            _ => Err(Stop::Malformed(format!(
                "packed field {} has a partial value",
                field.name()
            ))),
        };
    }
    Err(Stop::Malformed(format!(
        "field {} has wire type {wire}, not one its type allows",
        field.name()
    )))
}

/// Skips a field of an unknown number in a map entry.
fn skip(buf: &[u8], pos: &mut usize, wire: u64) -> Result<(), Stop> {
    match wire {
        VARINT => varint(buf, pos).map(drop),
        FIXED64 => take(buf, pos, 8).map(drop),
        FIXED32 => take(buf, pos, 4).map(drop),
        LEN => {
            let len = varint(buf, pos)?;
            take(buf, pos, len).map(drop)
        }
        START_GROUP | END_GROUP => Err(Stop::Malformed("a group in a map entry".into())),
        _ => Err(Stop::Malformed(format!("invalid wire type {wire}"))),
    }
}
