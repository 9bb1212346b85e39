//! Message schemas: compiling a schema once, validating payloads against it, and deciding
//! whether a new version of a schema is compatible with the versions before it.
//!
//! Three kinds, as in the Confluent and Redpanda registries: Protobuf (a `.proto` file, compiled
//! in process with `protox`, payloads decoded with `prost-reflect`), JSON Schema (the
//! `jsonschema` crate, remote `$ref`s refused) and Avro (`apache-avro`, binary datums).
//!
//! Everything here is pure and bounded: a schema larger than [`Limits::max_schema_bytes`], a
//! document nested deeper than [`Limits::max_depth`] or a payload larger than
//! [`Limits::max_message_bytes`] is refused with a clear error before any work is done on it.
//! The registry (versions, modes, which station uses what) lives in the metadata group; this
//! crate only answers "is this payload valid" and "may this version follow those".
//!
//! ## Compatibility
//! [`CompatibilityMode`] has the registries' meanings. `BACKWARD`: consumers using the new
//! schema can read data written with the previous one. `FORWARD`: consumers still on the
//! previous schema can read data written with the new one. `FULL`: both. The `_TRANSITIVE`
//! variants check against every earlier version, not only the latest. [`check`] returns every
//! violation found, each with the path of the field and the rule it breaks.

mod avro;
mod json;
mod proto;
mod proto_wire;

use std::fmt;

/// The schema languages and the compatibility modes are the registry's own types (names,
/// parsing and printing live with the metadata that stores them).
pub use junction_types::schema::{Compatibility as CompatibilityMode, SchemaType as SchemaKind};

/// Whether readers of the new version must read data of earlier ones.
fn backward(mode: CompatibilityMode) -> bool {
    matches!(
        mode,
        CompatibilityMode::Backward
            | CompatibilityMode::BackwardTransitive
            | CompatibilityMode::Full
            | CompatibilityMode::FullTransitive
    )
}

/// Whether readers of earlier versions must read data of the new one.
fn forward(mode: CompatibilityMode) -> bool {
    matches!(
        mode,
        CompatibilityMode::Forward
            | CompatibilityMode::ForwardTransitive
            | CompatibilityMode::Full
            | CompatibilityMode::FullTransitive
    )
}

/// Whether every earlier version counts, not only the latest.
fn transitive(mode: CompatibilityMode) -> bool {
    matches!(
        mode,
        CompatibilityMode::BackwardTransitive
            | CompatibilityMode::ForwardTransitive
            | CompatibilityMode::FullTransitive
    )
}

/// Bounds on the work one schema or one message may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest schema text.
    pub max_schema_bytes: usize,
    /// Deepest nesting of a JSON document or schema, or of Protobuf and Avro values.
    pub max_depth: usize,
    /// Largest payload validated.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_schema_bytes: 1 << 20,
            max_depth: 64,
            max_message_bytes: 8 << 20,
        }
    }
}

/// Why a schema could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("the schema is {bytes} bytes; at most {limit} are accepted")]
    TooLarge { bytes: usize, limit: usize },
    #[error("the schema nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    #[error("the {kind} schema does not parse: {message}")]
    Parse { kind: SchemaKind, message: String },
    #[error(
        "the schema refers to '{0}', which is not in the schema itself (remote references are not fetched; inline the definition)"
    )]
    RemoteRef(String),
    #[error("the Protobuf schema defines no message")]
    NoMessage,
    #[error("the Protobuf schema has no message named '{0}'")]
    UnknownMessage(String),
}

/// Why a payload is not valid for a schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {rule}", if path.is_empty() { "message" } else { path.as_str() })]
pub struct Invalid {
    /// Where in the message (`items[2].sku`, `/items/2/sku`); empty for the whole message.
    pub path: String,
    /// What is wrong there.
    pub rule: String,
}

impl Invalid {
    fn whole(rule: impl Into<String>) -> Self {
        Self {
            path: String::new(),
            rule: rule.into(),
        }
    }
}

/// One reason a version may not follow an earlier one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The earlier version it conflicts with.
    pub version: u32,
    /// `backward` (new readers, old data) or `forward` (old readers, new data).
    pub direction: &'static str,
    /// The field (or definition) concerned.
    pub path: String,
    /// A stable rule name (`FIELD_TYPE_CHANGED`, `REQUIRED_PROPERTY_ADDED`, ...).
    pub rule: &'static str,
    /// What changed, for people.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} against version {} ({}): {}: {}",
            self.rule,
            self.version,
            self.direction,
            if self.path.is_empty() {
                "<root>"
            } else {
                &self.path
            },
            self.detail
        )
    }
}

/// A finding of a one-way check (`reader` reads data of `writer`), before it is tied to a
/// version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Finding {
    pub path: String,
    pub rule: &'static str,
    pub detail: String,
}

impl Finding {
    pub(crate) fn new(
        path: impl Into<String>,
        rule: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            path: path.into(),
            rule,
            detail: detail.into(),
        }
    }
}

enum Compiled {
    Proto(proto::Compiled),
    Json(json::Compiled),
    Avro(avro::Compiled),
}

/// A compiled schema, ready to validate payloads. Compile once, share (it is `Send + Sync`).
pub struct Schema {
    kind: SchemaKind,
    limits: Limits,
    compiled: Compiled,
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Schema {
    /// Compiles `text` as a schema of `kind`. For Protobuf, `message` names the message type
    /// of the payloads (full name, or the name within the file's package); without it, the
    /// file's first message.
    pub fn compile(
        kind: SchemaKind,
        text: &str,
        message: Option<&str>,
        limits: Limits,
    ) -> Result<Schema, SchemaError> {
        if text.len() > limits.max_schema_bytes {
            return Err(SchemaError::TooLarge {
                bytes: text.len(),
                limit: limits.max_schema_bytes,
            });
        }
        let compiled = match kind {
            SchemaKind::Protobuf => Compiled::Proto(proto::Compiled::new(text, message)?),
            SchemaKind::Json => Compiled::Json(json::Compiled::new(text, &limits)?),
            SchemaKind::Avro => Compiled::Avro(avro::Compiled::new(text, &limits)?),
        };
        Ok(Schema {
            kind,
            limits,
            compiled,
        })
    }

    pub fn kind(&self) -> SchemaKind {
        self.kind
    }

    /// Checks one payload.
    pub fn validate(&self, payload: &[u8]) -> Result<(), Invalid> {
        if payload.len() > self.limits.max_message_bytes {
            return Err(Invalid::whole(format!(
                "the message is {} bytes; messages validated against a schema may have at most {}",
                payload.len(),
                self.limits.max_message_bytes
            )));
        }
        match &self.compiled {
            Compiled::Proto(c) => c.validate(payload, self.limits.max_depth),
            Compiled::Json(c) => c.validate(payload, self.limits.max_depth),
            Compiled::Avro(c) => c.validate(payload),
        }
    }

    /// Decodes a payload to JSON, as `junction read --decode` prints it: a Protobuf message in
    /// the canonical Protobuf JSON mapping, an Avro datum in apache-avro's JSON form of its
    /// values, a JSON document as itself. A payload that does not decode is `Invalid`.
    pub fn to_json(&self, payload: &[u8]) -> Result<serde_json::Value, Invalid> {
        match &self.compiled {
            Compiled::Proto(c) => c.to_json(payload),
            Compiled::Json(_) => serde_json::from_slice(payload)
                .map_err(|e| Invalid::whole(format!("not a JSON document: {e}"))),
            Compiled::Avro(c) => c.to_json(payload),
        }
    }

    /// What goes wrong when a reader using `self` reads data written with `writer`.
    fn can_read(&self, writer: &Schema) -> Vec<Finding> {
        match (&self.compiled, &writer.compiled) {
            (Compiled::Proto(r), Compiled::Proto(w)) => r.can_read(w),
            (Compiled::Json(r), Compiled::Json(w)) => r.can_read(w, self.limits.max_depth),
            (Compiled::Avro(r), Compiled::Avro(w)) => r.can_read(w),
            _ => vec![Finding::new(
                "",
                "SCHEMA_TYPE_CHANGED",
                format!("{} cannot replace {}", self.kind, writer.kind),
            )],
        }
    }
}

/// Checks that `new` may follow `earlier` (`(version, schema)`, oldest first) under `mode`.
/// Returns every violation; an empty history, or mode `NONE`, accepts anything.
pub fn check(
    new: &Schema,
    earlier: &[(u32, &Schema)],
    mode: CompatibilityMode,
) -> Result<(), Vec<Violation>> {
    let against: &[(u32, &Schema)] = if transitive(mode) {
        earlier
    } else {
        earlier.last().map_or(&[], std::slice::from_ref)
    };
    let mut out = Vec::new();
    for (version, old) in against {
        if backward(mode) {
            out.extend(new.can_read(old).into_iter().map(|f| Violation {
                version: *version,
                direction: "backward",
                path: f.path,
                rule: f.rule,
                detail: f.detail,
            }));
        }
        if forward(mode) {
            out.extend(old.can_read(new).into_iter().map(|f| Violation {
                version: *version,
                direction: "forward",
                path: f.path,
                rule: f.rule,
                detail: f.detail,
            }));
        }
    }
    if out.is_empty() { Ok(()) } else { Err(out) }
}

#[cfg(test)]
mod tests;
