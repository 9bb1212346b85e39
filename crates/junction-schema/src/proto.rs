//! Protobuf: a `.proto` file compiled in process (imports only of the well-known
//! `google/protobuf/*` types), payloads decoded with the message's descriptor.
//!
//! A payload is valid when it decodes as the message and carries no field the schema does
//! not know (at any depth): an unknown field means the producer used another schema.
//!
//! Compatibility compares fields by number, as the wire does: a renamed field is the same
//! field; a removed field is skipped by readers; a field whose number now has an
//! incompatible type, another message or enum type, or another cardinality breaks readers.
//! Scalars that share a wire encoding and decode into each other's range are compatible
//! (`int32`/`int64`/`uint32`/`uint64`/`bool`, `sint32`/`sint64`, `fixed32`/`sfixed32`,
//! `fixed64`/`sfixed64`, `string`/`bytes`), as in the Protobuf language guide. A `proto2`
//! required field the writer may omit breaks readers.

use std::collections::HashSet;

use prost_reflect::{
    Cardinality, DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor,
    ReflectMessage, Value,
};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

use crate::{Finding, Invalid, SchemaError, SchemaKind};

/// The name the schema's text is compiled under.
const FILE_NAME: &str = "schema.proto";

pub(crate) struct Compiled {
    pub(crate) message: MessageDescriptor,
    /// Whether payloads are validated by walking the wire format (no proto2 groups).
    pub(crate) walkable: bool,
}

/// Serves the schema's own text, and nothing else, under [`FILE_NAME`].
struct Single(String);

impl FileResolver for Single {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        if name == FILE_NAME {
            File::from_source(name, &self.0)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

fn parse_error(message: impl std::fmt::Display) -> SchemaError {
    SchemaError::Parse {
        kind: SchemaKind::Protobuf,
        message: message.to_string(),
    }
}

impl Compiled {
    pub(crate) fn new(text: &str, message: Option<&str>) -> Result<Self, SchemaError> {
        let mut resolver = ChainFileResolver::new();
        resolver.add(Single(text.to_owned()));
        resolver.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler.include_imports(true);
        compiler.open_file(FILE_NAME).map_err(parse_error)?;
        let pool: DescriptorPool = compiler.descriptor_pool();
        let file = pool
            .get_file_by_name(FILE_NAME)
            .ok_or_else(|| parse_error("the compiled file is missing"))?;
        let package = file.package_name().to_owned();
        let found = match message {
            Some(name) => {
                let qualified = if package.is_empty() {
                    name.to_owned()
                } else {
                    format!("{package}.{name}")
                };
                pool.get_message_by_name(name)
                    .or_else(|| pool.get_message_by_name(&qualified))
                    .ok_or_else(|| SchemaError::UnknownMessage(name.to_owned()))?
            }
            None => file.messages().next().ok_or(SchemaError::NoMessage)?,
        };
        Ok(Self {
            walkable: crate::proto_wire::walkable(&found),
            message: found,
        })
    }

    pub(crate) fn validate(&self, payload: &[u8], max_depth: usize) -> Result<(), Invalid> {
        if !self.walkable {
            return self.validate_by_decoding(payload, max_depth);
        }
        crate::proto_wire::walk(&self.message, payload, 0, max_depth)
            .map_err(|s| s.into_invalid(&self.message))
    }

    /// Validates by decoding into a `DynamicMessage` and refusing unknown fields: the path
    /// of schemas with groups, and the reference the wire walk is tested against.
    pub(crate) fn validate_by_decoding(
        &self,
        payload: &[u8],
        max_depth: usize,
    ) -> Result<(), Invalid> {
        let msg = DynamicMessage::decode(self.message.clone(), payload).map_err(|e| {
            Invalid::whole(format!(
                "not a valid {} message: {e}",
                self.message.full_name()
            ))
        })?;
        check_known(&msg, "", 0, max_depth)
    }

    pub(crate) fn to_json(&self, payload: &[u8]) -> Result<serde_json::Value, Invalid> {
        let msg = DynamicMessage::decode(self.message.clone(), payload).map_err(|e| {
            Invalid::whole(format!(
                "not a valid {} message: {e}",
                self.message.full_name()
            ))
        })?;
        serde_json::to_value(&msg)
            .map_err(|e| Invalid::whole(format!("cannot print the message as JSON: {e}")))
    }

    /// What breaks when a reader of `self` reads data written with `writer`.
    pub(crate) fn can_read(&self, writer: &Compiled) -> Vec<Finding> {
        let mut out = Vec::new();
        if self.message.full_name() != writer.message.full_name() {
            out.push(Finding::new(
                "",
                "MESSAGE_CHANGED",
                format!(
                    "payloads were {} and are now {}",
                    writer.message.full_name(),
                    self.message.full_name()
                ),
            ));
            return out;
        }
        let mut seen = HashSet::new();
        compare(&self.message, &writer.message, "", &mut seen, &mut out);
        out
    }
}

/// Refuses fields the schema does not define, at any depth.
fn check_known(
    msg: &DynamicMessage,
    path: &str,
    depth: usize,
    max_depth: usize,
) -> Result<(), Invalid> {
    if depth > max_depth {
        return Err(Invalid {
            path: path.to_owned(),
            rule: format!("nested deeper than {max_depth} levels"),
        });
    }
    if let Some(u) = msg.unknown_fields().next() {
        return Err(Invalid {
            path: path.to_owned(),
            rule: format!(
                "field number {} is not in the schema of {}",
                u.number(),
                msg.descriptor().full_name()
            ),
        });
    }
    for (field, value) in msg.fields() {
        let here = join(path, field.name());
        match value {
            Value::Message(m) => check_known(m, &here, depth + 1, max_depth)?,
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    if let Value::Message(m) = item {
                        check_known(m, &format!("{here}[{i}]"), depth + 1, max_depth)?;
                    }
                }
            }
            Value::Map(entries) => {
                for (k, item) in entries {
                    if let Value::Message(m) = item {
                        check_known(m, &format!("{here}[{k:?}]"), depth + 1, max_depth)?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// Which scalars decode into each other (the wire encoding and the value range agree).
fn scalar_family(kind: &Kind) -> Option<u8> {
    Some(match kind {
        Kind::Int32 | Kind::Int64 | Kind::Uint32 | Kind::Uint64 | Kind::Bool => 0,
        Kind::Sint32 | Kind::Sint64 => 1,
        Kind::Fixed32 | Kind::Sfixed32 => 2,
        Kind::Fixed64 | Kind::Sfixed64 => 3,
        Kind::String | Kind::Bytes => 4,
        Kind::Float => 5,
        Kind::Double => 6,
        Kind::Message(_) | Kind::Enum(_) => return None,
    })
}

fn kind_name(kind: &Kind) -> String {
    match kind {
        Kind::Message(m) => m.full_name().to_owned(),
        Kind::Enum(e) => e.full_name().to_owned(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

fn cardinality(f: &FieldDescriptor) -> &'static str {
    if f.is_map() {
        "map"
    } else if f.is_list() {
        "repeated"
    } else {
        "singular"
    }
}

fn compare(
    reader: &MessageDescriptor,
    writer: &MessageDescriptor,
    path: &str,
    seen: &mut HashSet<(String, String)>,
    out: &mut Vec<Finding>,
) {
    if !seen.insert((reader.full_name().to_owned(), writer.full_name().to_owned())) {
        return;
    }
    for w in writer.fields() {
        let Some(r) = reader.get_field(w.number()) else {
            // Removed: readers skip it.
            continue;
        };
        let here = join(path, r.name());
        if cardinality(&r) != cardinality(&w) {
            out.push(Finding::new(
                here,
                "FIELD_CARDINALITY_CHANGED",
                format!(
                    "field {} was {} and is {}",
                    w.number(),
                    cardinality(&w),
                    cardinality(&r)
                ),
            ));
            continue;
        }
        let (rk, wk) = (r.kind(), w.kind());
        match (&rk, &wk) {
            (Kind::Message(rm), Kind::Message(wm)) => {
                if rm.full_name() == wm.full_name() {
                    compare(rm, wm, &here, seen, out);
                } else {
                    out.push(Finding::new(
                        here,
                        "FIELD_NAMED_TYPE_CHANGED",
                        format!("was {} and is {}", wm.full_name(), rm.full_name()),
                    ));
                }
            }
            (Kind::Enum(re), Kind::Enum(we)) => {
                if re.full_name() != we.full_name() {
                    out.push(Finding::new(
                        here,
                        "FIELD_NAMED_TYPE_CHANGED",
                        format!("was {} and is {}", we.full_name(), re.full_name()),
                    ));
                }
            }
            _ => {
                let same = match (scalar_family(&rk), scalar_family(&wk)) {
                    (Some(a), Some(b)) => a == b,
                    _ => false,
                };
                if !same {
                    out.push(Finding::new(
                        here,
                        "FIELD_TYPE_CHANGED",
                        format!("was {} and is {}", kind_name(&wk), kind_name(&rk)),
                    ));
                }
            }
        }
    }
    for r in reader.fields() {
        let required = r.cardinality() == Cardinality::Required;
        let writer_required = writer
            .get_field(r.number())
            .is_some_and(|w| w.cardinality() == Cardinality::Required);
        if required && !writer_required {
            out.push(Finding::new(
                join(path, r.name()),
                "REQUIRED_FIELD_ADDED",
                format!(
                    "field {} is required, but data written before may not have it",
                    r.number()
                ),
            ));
        }
    }
}
