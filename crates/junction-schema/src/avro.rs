//! Avro: a payload is one binary datum of the schema (no container file header), and must be
//! read to its last byte. Compatibility is Avro's own schema resolution (`apache-avro`'s
//! checker: the reader can resolve every writer datum, with defaults for added fields and
//! promotions such as `int` to `long`).
//!
//! Recursive schemas (a record that contains itself) are refused: decoding one follows the
//! data as deep as it goes, and a crafted payload could nest far enough to exhaust the stack.

use apache_avro::Schema as AvroSchema;
use apache_avro::schema::Name;
use apache_avro::schema_compatibility::SchemaCompatibility;

use crate::{Finding, Invalid, Limits, SchemaError, SchemaKind};

pub(crate) struct Compiled {
    schema: AvroSchema,
}

fn parse_error(message: impl std::fmt::Display) -> SchemaError {
    SchemaError::Parse {
        kind: SchemaKind::Avro,
        message: message.to_string(),
    }
}

/// Whether a record refers to itself (directly or through other types), or the schema nests
/// deeper than `max_depth`.
fn check_shape(
    s: &AvroSchema,
    enclosing: &mut Vec<Name>,
    level: usize,
    max_depth: usize,
) -> Result<(), SchemaError> {
    if level > max_depth {
        return Err(SchemaError::TooDeep { limit: max_depth });
    }
    match s {
        AvroSchema::Ref { name } if enclosing.contains(name) => Err(parse_error(format!(
            "record '{}' contains itself; recursive schemas are not accepted for validation",
            name.name()
        ))),
        AvroSchema::Record(r) => {
            enclosing.push(r.name.clone());
            for f in &r.fields {
                check_shape(&f.schema, enclosing, level + 1, max_depth)?;
            }
            enclosing.pop();
            Ok(())
        }
        AvroSchema::Array(a) => check_shape(&a.items, enclosing, level + 1, max_depth),
        AvroSchema::Map(m) => check_shape(&m.types, enclosing, level + 1, max_depth),
        AvroSchema::Union(u) => {
            for v in u.variants() {
                check_shape(v, enclosing, level + 1, max_depth)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

impl Compiled {
    pub(crate) fn new(text: &str, limits: &Limits) -> Result<Self, SchemaError> {
        let schema = AvroSchema::parse_str(text).map_err(parse_error)?;
        check_shape(&schema, &mut Vec::new(), 0, limits.max_depth)?;
        Ok(Self { schema })
    }

    pub(crate) fn validate(&self, payload: &[u8]) -> Result<(), Invalid> {
        self.read(payload).map(drop)
    }

    pub(crate) fn to_json(&self, payload: &[u8]) -> Result<serde_json::Value, Invalid> {
        serde_json::Value::try_from(self.read(payload)?)
            .map_err(|e| Invalid::whole(format!("cannot print the datum as JSON: {e}")))
    }

    /// Reads the one datum `payload` must hold.
    fn read(&self, payload: &[u8]) -> Result<apache_avro::types::Value, Invalid> {
        let mut rest = payload;
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&self.schema)
            .build()
            .map_err(|e| Invalid::whole(format!("cannot read with this schema: {e}")))?;
        let value = reader
            .read_value(&mut rest)
            .map_err(|e| Invalid::whole(format!("not a datum of the schema: {e}")))?;
        if !rest.is_empty() {
            return Err(Invalid::whole(format!(
                "{} bytes are left after the datum",
                rest.len()
            )));
        }
        Ok(value)
    }

    pub(crate) fn can_read(&self, writer: &Compiled) -> Vec<Finding> {
        match SchemaCompatibility::can_read(&writer.schema, &self.schema) {
            Ok(_) => Vec::new(),
            Err(e) => vec![Finding::new("", "AVRO_RESOLUTION_FAILS", e.to_string())],
        }
    }
}
