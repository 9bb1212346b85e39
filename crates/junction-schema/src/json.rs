//! JSON Schema: validated with the `jsonschema` crate. References must point into the schema
//! itself (`#/...`); anything else is refused when the schema is compiled, so validation
//! never reaches the network or the file system.
//!
//! Compatibility asks "does every document the writer's schema accepts pass the reader's?",
//! keyword by keyword, with the Confluent registry's rules: a reader may widen types, bounds
//! and enums, drop requirements, and add properties only where the writer's content model is
//! closed (`additionalProperties: false`); in an open content model any property may already
//! hold any value, so a property added there with a type of its own is a violation
//! (`PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL`). Combinators (`anyOf`, `oneOf`, `allOf`, `not`,
//! `if`) are compared for equality only: a change in one is reported as not analysed.

use std::collections::HashSet;

use serde_json::{Map, Value};

use crate::{Finding, Invalid, Limits, SchemaError, SchemaKind};

pub(crate) struct Compiled {
    schema: Value,
    validator: jsonschema::Validator,
}

fn parse_error(message: impl std::fmt::Display) -> SchemaError {
    SchemaError::Parse {
        kind: SchemaKind::Json,
        message: message.to_string(),
    }
}

/// The deepest nesting of `v` (a scalar is 0), without recursion.
fn depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 0usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(m) => stack.extend(m.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    max
}

/// The first `$ref` that does not point into the schema itself.
fn remote_ref(v: &Value) -> Option<String> {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(m) => {
                for (k, x) in m {
                    if k == "$ref"
                        && let Value::String(s) = x
                        && !s.starts_with('#')
                    {
                        return Some(s.clone());
                    }
                    stack.push(x);
                }
            }
            _ => {}
        }
    }
    None
}

impl Compiled {
    pub(crate) fn new(text: &str, limits: &Limits) -> Result<Self, SchemaError> {
        let schema: Value = serde_json::from_str(text).map_err(parse_error)?;
        if depth(&schema) > limits.max_depth {
            return Err(SchemaError::TooDeep {
                limit: limits.max_depth,
            });
        }
        if let Some(r) = remote_ref(&schema) {
            return Err(SchemaError::RemoteRef(r));
        }
        let validator = jsonschema::options()
            .build(&schema)
            .map_err(|e| parse_error(e.masked()))?;
        Ok(Self { schema, validator })
    }

    pub(crate) fn validate(&self, payload: &[u8], max_depth: usize) -> Result<(), Invalid> {
        let doc: Value = serde_json::from_slice(payload)
            .map_err(|e| Invalid::whole(format!("not a JSON document: {e}")))?;
        if depth(&doc) > max_depth {
            return Err(Invalid::whole(format!(
                "the document nests deeper than {max_depth} levels"
            )));
        }
        match self.validator.iter_errors(&doc).next() {
            None => Ok(()),
            Some(e) => Err(Invalid {
                path: e.instance_path().to_string(),
                rule: e.masked().to_string(),
            }),
        }
    }

    pub(crate) fn can_read(&self, writer: &Compiled, max_depth: usize) -> Vec<Finding> {
        let mut cx = Cx {
            reader_root: &self.schema,
            writer_root: &writer.schema,
            seen: HashSet::new(),
            out: Vec::new(),
            max_depth,
        };
        cx.compare(&self.schema, &writer.schema, "", 0);
        cx.out
    }
}

/// Keywords that say nothing about which documents are valid.
const ANNOTATIONS: [&str; 9] = [
    "title",
    "description",
    "$comment",
    "default",
    "examples",
    "$id",
    "$schema",
    "deprecated",
    "readOnly",
];

/// Combinators this check does not analyse.
const COMBINATORS: [&str; 7] = ["anyOf", "oneOf", "allOf", "not", "if", "then", "else"];

/// Lower bounds (a reader may only lower them) and upper bounds (only raise them).
const LOWER: [&str; 5] = [
    "minimum",
    "exclusiveMinimum",
    "minLength",
    "minItems",
    "minProperties",
];
const UPPER: [&str; 5] = [
    "maximum",
    "exclusiveMaximum",
    "maxLength",
    "maxItems",
    "maxProperties",
];

/// Whether the schema accepts every document.
fn accepts_all(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Object(m) => m.keys().all(|k| ANNOTATIONS.contains(&k.as_str())),
        _ => false,
    }
}

fn types(m: &Map<String, Value>) -> Option<Vec<String>> {
    match m.get("type")? {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }
}

fn covers(reader: &[String], t: &str) -> bool {
    reader
        .iter()
        .any(|r| r == t || (r == "number" && t == "integer"))
}

fn join(path: &str, key: &str) -> String {
    format!("{path}/{key}")
}

struct Cx<'a> {
    reader_root: &'a Value,
    writer_root: &'a Value,
    /// (reader pointer, writer pointer) pairs already compared (recursive definitions).
    seen: HashSet<(String, String)>,
    out: Vec<Finding>,
    max_depth: usize,
}

/// Follows `$ref`s (local JSON pointers) from `v` in `root`, at most 32 hops.
fn resolve<'a>(root: &'a Value, mut v: &'a Value) -> (&'a Value, Option<String>) {
    let mut via = None;
    for _ in 0..32 {
        let Some(Value::String(r)) = v.get("$ref") else {
            break;
        };
        let pointer = r.trim_start_matches('#');
        match root.pointer(pointer) {
            Some(target) => {
                via = Some(r.clone());
                v = target;
            }
            None => break,
        }
    }
    (v, via)
}

impl Cx<'_> {
    fn find(&mut self, path: &str, rule: &'static str, detail: impl Into<String>) {
        self.out.push(Finding::new(path, rule, detail));
    }

    fn compare(&mut self, reader: &Value, writer: &Value, path: &str, level: usize) {
        if level > self.max_depth {
            self.find(
                path,
                "NOT_ANALYSED",
                format!("nested deeper than {} levels", self.max_depth),
            );
            return;
        }
        let (reader, rref) = resolve(self.reader_root, reader);
        let (writer, wref) = resolve(self.writer_root, writer);
        if let (Some(r), Some(w)) = (&rref, &wref)
            && !self.seen.insert((r.clone(), w.clone()))
        {
            return;
        }
        if accepts_all(reader) || writer == &Value::Bool(false) {
            return;
        }
        if reader == writer {
            return;
        }
        let empty = Map::new();
        let (r, w) = match (reader, writer) {
            (Value::Object(r), Value::Object(w)) => (r, w),
            (Value::Object(r), Value::Bool(true)) => (r, &empty),
            (Value::Bool(false), _) => {
                self.find(path, "SCHEMA_CLOSED", "the reader accepts nothing here");
                return;
            }
            _ => {
                self.find(path, "NOT_ANALYSED", "not a schema object");
                return;
            }
        };
        for c in COMBINATORS {
            if r.get(c) != w.get(c) {
                self.find(
                    path,
                    "COMBINATOR_CHANGED",
                    format!("'{c}' changed; combinators are compared for equality only"),
                );
            }
        }
        self.compare_types(r, w, path);
        self.compare_values(r, w, path);
        self.compare_bounds(r, w, path);
        self.compare_object(r, w, path, level);
        self.compare_array(r, w, path, level);
    }

    fn compare_types(&mut self, r: &Map<String, Value>, w: &Map<String, Value>, path: &str) {
        let Some(rt) = types(r) else {
            return;
        };
        match types(w) {
            None => self.find(
                path,
                "TYPE_NARROWED",
                format!("any type was allowed, now only {}", rt.join(", ")),
            ),
            Some(wt) => {
                for t in wt.iter().filter(|t| !covers(&rt, t)) {
                    self.find(
                        path,
                        "TYPE_CHANGED",
                        format!("'{t}' was allowed, now only {}", rt.join(", ")),
                    );
                }
            }
        }
    }

    fn compare_values(&mut self, r: &Map<String, Value>, w: &Map<String, Value>, path: &str) {
        // The values the writer may produce, when it limits them.
        let writer_values: Option<Vec<&Value>> = match (w.get("const"), w.get("enum")) {
            (Some(c), _) => Some(vec![c]),
            (None, Some(Value::Array(e))) => Some(e.iter().collect()),
            _ => None,
        };
        if let Some(Value::Array(allowed)) = r.get("enum") {
            match &writer_values {
                None => self.find(path, "ENUM_ADDED", "any value was allowed, now an enum"),
                Some(vals) => {
                    for v in vals.iter().filter(|v| !allowed.contains(v)) {
                        self.find(
                            path,
                            "ENUM_VALUE_REMOVED",
                            format!("{v} is no longer allowed"),
                        );
                    }
                }
            }
        }
        if let Some(c) = r.get("const") {
            let same = writer_values
                .as_ref()
                .is_some_and(|vals| vals.iter().all(|v| *v == c));
            if !same {
                self.find(path, "CONST_CHANGED", format!("only {c} is allowed now"));
            }
        }
    }

    fn compare_bounds(&mut self, r: &Map<String, Value>, w: &Map<String, Value>, path: &str) {
        let num = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_f64);
        for k in LOWER {
            if let Some(rv) = num(r, k) {
                match num(w, k) {
                    Some(wv) if rv <= wv => {}
                    Some(wv) => self.find(path, "BOUND_NARROWED", format!("{k} was {wv}, is {rv}")),
                    None => self.find(path, "BOUND_ADDED", format!("{k} {rv} is new")),
                }
            }
        }
        for k in UPPER {
            if let Some(rv) = num(r, k) {
                match num(w, k) {
                    Some(wv) if rv >= wv => {}
                    Some(wv) => self.find(path, "BOUND_NARROWED", format!("{k} was {wv}, is {rv}")),
                    None => self.find(path, "BOUND_ADDED", format!("{k} {rv} is new")),
                }
            }
        }
        if let Some(rm) = num(r, "multipleOf") {
            let ok = num(w, "multipleOf").is_some_and(|wm| (wm / rm).fract() == 0.0);
            if !ok {
                self.find(
                    path,
                    "BOUND_NARROWED",
                    format!("multipleOf {rm} is stricter"),
                );
            }
        }
        for k in ["pattern", "format"] {
            if let Some(rv) = r.get(k)
                && w.get(k) != Some(rv)
            {
                self.find(
                    path,
                    "STRING_CONSTRAINT_CHANGED",
                    format!("{k} changed to {rv}"),
                );
            }
        }
        if r.get("uniqueItems") == Some(&Value::Bool(true))
            && w.get("uniqueItems") != Some(&Value::Bool(true))
        {
            self.find(path, "BOUND_ADDED", "uniqueItems is new");
        }
    }

    fn compare_object(
        &mut self,
        r: &Map<String, Value>,
        w: &Map<String, Value>,
        path: &str,
        level: usize,
    ) {
        let empty = Map::new();
        let rp = r
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let wp = w
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        let open = Value::Bool(true);
        let r_add = r.get("additionalProperties").unwrap_or(&open);
        let w_add = w.get("additionalProperties").unwrap_or(&open);
        let required = |m: &Map<String, Value>| -> Vec<String> {
            m.get("required")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let w_required = required(w);
        for p in required(r) {
            if !w_required.contains(&p) {
                self.find(
                    &join(path, &p),
                    "REQUIRED_PROPERTY_ADDED",
                    "data written before may not have it",
                );
            }
        }
        for (name, ws) in wp {
            let here = join(path, name);
            match rp.get(name) {
                Some(rs) => self.compare(rs, ws, &here, level + 1),
                None if r_add == &Value::Bool(false) => self.find(
                    &here,
                    "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                    "the writer may set it and the reader allows no other properties",
                ),
                None => self.compare(r_add, ws, &here, level + 1),
            }
        }
        for (name, rs) in rp {
            if wp.contains_key(name) {
                continue;
            }
            let here = join(path, name);
            match w_add {
                Value::Bool(false) => {}
                Value::Bool(true) => {
                    if !accepts_all(rs) {
                        self.find(
                            &here,
                            "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                            "the writer allows any other property with any value; close its content model (additionalProperties: false) before adding typed properties",
                        );
                    }
                }
                ws => self.compare(rs, ws, &here, level + 1),
            }
        }
        match (r_add, w_add) {
            (_, Value::Bool(false)) => {}
            (Value::Bool(false), _) => self.find(
                path,
                "ADDITIONAL_PROPERTIES_NARROWED",
                "other properties were allowed and are not any more",
            ),
            (ra, wa) => self.compare(ra, wa, &join(path, "additionalProperties"), level + 1),
        }
    }

    fn compare_array(
        &mut self,
        r: &Map<String, Value>,
        w: &Map<String, Value>,
        path: &str,
        level: usize,
    ) {
        if r.get("prefixItems") != w.get("prefixItems") {
            self.find(
                path,
                "NOT_ANALYSED",
                "prefixItems changed; compared for equality only",
            );
        }
        if let Some(ri) = r.get("items") {
            let any = Value::Bool(true);
            let wi = w.get("items").unwrap_or(&any);
            self.compare(ri, wi, &join(path, "items"), level + 1);
        }
    }
}
