//! The compatibility table per schema type, and validation of good and bad payloads.

use super::*;

fn compile(kind: SchemaKind, text: &str) -> Schema {
    Schema::compile(kind, text, None, Limits::default())
        .unwrap_or_else(|e| panic!("{kind} schema does not compile: {e}\n{text}"))
}

/// The rules broken when `versions` (oldest first, the last one new) are checked in `mode`;
/// empty when compatible.
fn rules(kind: SchemaKind, versions: &[&str], mode: CompatibilityMode) -> Vec<&'static str> {
    let compiled: Vec<Schema> = versions.iter().map(|t| compile(kind, t)).collect();
    let (new, earlier) = compiled.split_last().expect("at least one version");
    let earlier: Vec<(u32, &Schema)> = earlier
        .iter()
        .enumerate()
        .map(|(i, s)| (i as u32 + 1, s))
        .collect();
    match check(new, &earlier, mode) {
        Ok(()) => Vec::new(),
        Err(v) => v.into_iter().map(|v| v.rule).collect(),
    }
}

use CompatibilityMode::{
    Backward, BackwardTransitive, Forward, ForwardTransitive, Full, FullTransitive,
};

// ---------- Protobuf ----------

const PROTO_V1: &str = r#"syntax = "proto3";
package shop;
message Order { string id = 1; int32 qty = 2; Item item = 3; }
message Item { string sku = 1; }
"#;

fn proto(body: &str) -> String {
    format!(
        "syntax = \"proto3\";\npackage shop;\n{body}\nmessage Item {{ string sku = 1; }}\nmessage Other {{ string x = 1; }}\n"
    )
}

#[test]
fn protobuf_compatibility_table() {
    let p = SchemaKind::Protobuf;
    let cases: Vec<(&str, String, CompatibilityMode, Vec<&str>)> = vec![
        (
            "add a field",
            proto("message Order { string id = 1; int32 qty = 2; Item item = 3; double price = 4; }"),
            Full,
            vec![],
        ),
        (
            "remove a field",
            proto("message Order { string id = 1; Item item = 3; }"),
            Full,
            vec![],
        ),
        (
            "rename a field (same number)",
            proto("message Order { string id = 1; int32 quantity = 2; Item item = 3; }"),
            Full,
            vec![],
        ),
        (
            "widen int32 to int64",
            proto("message Order { string id = 1; int64 qty = 2; Item item = 3; }"),
            Full,
            vec![],
        ),
        (
            "change a field's type",
            proto("message Order { string id = 1; string qty = 2; Item item = 3; }"),
            Backward,
            vec!["FIELD_TYPE_CHANGED"],
        ),
        (
            "change a field's message type",
            proto("message Order { string id = 1; int32 qty = 2; Other item = 3; }"),
            Forward,
            vec!["FIELD_NAMED_TYPE_CHANGED"],
        ),
        (
            "make a field repeated",
            proto("message Order { string id = 1; repeated int32 qty = 2; Item item = 3; }"),
            Backward,
            vec!["FIELD_CARDINALITY_CHANGED"],
        ),
        (
            "change a nested message's field",
            "syntax = \"proto3\";\npackage shop;\nmessage Order { string id = 1; int32 qty = 2; Item item = 3; }\nmessage Item { int64 sku = 1; }\n".to_owned(),
            Backward,
            vec!["FIELD_TYPE_CHANGED"],
        ),
        (
            "another root message",
            "syntax = \"proto3\";\npackage shop;\nmessage Invoice { string id = 1; }\n".to_owned(),
            Backward,
            vec!["MESSAGE_CHANGED"],
        ),
    ];
    for (name, v2, mode, want) in cases {
        assert_eq!(rules(p, &[PROTO_V1, &v2], mode), want, "{name} ({mode})");
    }
    // Removed, then re-added with another type: fine against the latest version only.
    let v2 = proto("message Order { string id = 1; Item item = 3; }");
    let v3 = proto("message Order { string id = 1; string qty = 2; Item item = 3; }");
    assert!(rules(p, &[PROTO_V1, &v2, &v3], Backward).is_empty());
    assert_eq!(
        rules(p, &[PROTO_V1, &v2, &v3], BackwardTransitive),
        vec!["FIELD_TYPE_CHANGED"]
    );
    assert_eq!(
        rules(p, &[PROTO_V1, &v2, &v3], FullTransitive),
        vec!["FIELD_TYPE_CHANGED", "FIELD_TYPE_CHANGED"]
    );
    // proto2: a new required field breaks new readers of old data, not old readers.
    let r1 = "syntax = \"proto2\";\nmessage Order { optional string id = 1; }\n";
    let r2 =
        "syntax = \"proto2\";\nmessage Order { optional string id = 1; required int32 qty = 2; }\n";
    assert_eq!(rules(p, &[r1, r2], Backward), vec!["REQUIRED_FIELD_ADDED"]);
    assert!(rules(p, &[r1, r2], Forward).is_empty());
}

#[test]
fn protobuf_payloads() {
    let s = compile(SchemaKind::Protobuf, PROTO_V1);
    // id = "a", qty = 5, item { sku = "x" }
    let good = [0x0a, 0x01, b'a', 0x10, 0x05, 0x1a, 0x03, 0x0a, 0x01, b'x'];
    assert_eq!(s.validate(&good), Ok(()));
    assert_eq!(s.validate(&[]), Ok(()), "proto3: every field may be absent");
    // Field 9 is not in the schema.
    let e = s.validate(&[0x0a, 0x01, b'a', 0x48, 0x01]).unwrap_err();
    assert!(e.rule.contains("field number 9"), "{e}");
    // ... nor field 7 of the nested item.
    let e = s.validate(&[0x1a, 0x02, 0x38, 0x01]).unwrap_err();
    assert_eq!(e.path, "item");
    // Truncated: a length that runs past the end.
    let e = s.validate(&[0x0a, 0x05, b'a']).unwrap_err();
    assert!(e.rule.contains("not a valid shop.Order"), "{e}");
    // A string that is not UTF-8.
    assert!(s.validate(&[0x0a, 0x01, 0xff]).is_err());
    // The payload type can be named.
    let item = Schema::compile(
        SchemaKind::Protobuf,
        PROTO_V1,
        Some("Item"),
        Limits::default(),
    )
    .expect("Item");
    assert_eq!(item.validate(&[0x0a, 0x01, b'x']), Ok(()));
}

#[test]
fn protobuf_schemas_that_do_not_compile() {
    let err = |text: &str, msg: Option<&str>| {
        Schema::compile(SchemaKind::Protobuf, text, msg, Limits::default()).unwrap_err()
    };
    assert!(matches!(err("message {", None), SchemaError::Parse { .. }));
    let e = err(
        "syntax = \"proto3\";\nimport \"other/thing.proto\";\nmessage A { other.Thing t = 1; }\n",
        None,
    );
    assert!(e.to_string().contains("other/thing.proto"), "{e}");
    // The well-known types are available.
    Schema::compile(
        SchemaKind::Protobuf,
        "syntax = \"proto3\";\nimport \"google/protobuf/timestamp.proto\";\nmessage A { google.protobuf.Timestamp at = 1; }\n",
        None,
        Limits::default(),
    )
    .expect("well-known import");
    assert_eq!(
        err("syntax = \"proto3\";\nenum E { A = 0; }\n", None),
        SchemaError::NoMessage
    );
    assert_eq!(
        err(PROTO_V1, Some("Nope")),
        SchemaError::UnknownMessage("Nope".to_owned())
    );
}

// ---------- JSON Schema ----------

const JSON_CLOSED: &str = r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"integer"}},"required":["id"],"additionalProperties":false}"#;
const JSON_OPEN: &str = r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"integer"}},"required":["id"]}"#;

#[test]
fn json_schema_compatibility_table() {
    let j = SchemaKind::Json;
    let cases: Vec<(&str, &str, &str, CompatibilityMode, Vec<&str>)> = vec![
        (
            "add an optional property to a closed model",
            JSON_CLOSED,
            r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"integer"},"note":{"type":"string"}},"required":["id"],"additionalProperties":false}"#,
            Backward,
            vec![],
        ),
        (
            "... which old readers (closed) cannot take",
            JSON_CLOSED,
            r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"integer"},"note":{"type":"string"}},"required":["id"],"additionalProperties":false}"#,
            Forward,
            vec!["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"],
        ),
        (
            "add a typed property to an open model",
            JSON_OPEN,
            r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"integer"},"note":{"type":"string"}},"required":["id"]}"#,
            Backward,
            vec!["PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL"],
        ),
        (
            "remove a property from an open model",
            JSON_OPEN,
            r#"{"type":"object","properties":{"id":{"type":"string"}},"required":["id"]}"#,
            Backward,
            vec![],
        ),
        (
            "remove a property from a closed model",
            JSON_CLOSED,
            r#"{"type":"object","properties":{"id":{"type":"string"}},"required":["id"],"additionalProperties":false}"#,
            Backward,
            vec!["PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL"],
        ),
        (
            "change a property's type",
            JSON_CLOSED,
            r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"string"}},"required":["id"],"additionalProperties":false}"#,
            Backward,
            vec!["TYPE_CHANGED"],
        ),
        (
            "widen integer to number",
            JSON_CLOSED,
            r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"number"}},"required":["id"],"additionalProperties":false}"#,
            Backward,
            vec![],
        ),
        (
            "... which old readers cannot take",
            JSON_CLOSED,
            r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"number"}},"required":["id"],"additionalProperties":false}"#,
            Forward,
            vec!["TYPE_CHANGED"],
        ),
        (
            "require a property",
            JSON_CLOSED,
            r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"integer"}},"required":["id","qty"],"additionalProperties":false}"#,
            Backward,
            vec!["REQUIRED_PROPERTY_ADDED"],
        ),
        (
            "narrow a bound",
            r#"{"type":"string","maxLength":20}"#,
            r#"{"type":"string","maxLength":10}"#,
            Backward,
            vec!["BOUND_NARROWED"],
        ),
        (
            "remove an enum value",
            r#"{"enum":["a","b","c"]}"#,
            r#"{"enum":["a","b"]}"#,
            Full,
            vec!["ENUM_VALUE_REMOVED"],
        ),
        (
            "close an open model",
            JSON_OPEN,
            JSON_CLOSED,
            Backward,
            vec!["ADDITIONAL_PROPERTIES_NARROWED"],
        ),
        (
            "a local $ref followed on both sides",
            r##"{"$defs":{"q":{"type":"integer"}},"type":"object","properties":{"qty":{"$ref":"#/$defs/q"}},"additionalProperties":false}"##,
            r##"{"$defs":{"q":{"type":"string"}},"type":"object","properties":{"qty":{"$ref":"#/$defs/q"}},"additionalProperties":false}"##,
            Backward,
            vec!["TYPE_CHANGED"],
        ),
        (
            "a changed combinator is reported, not guessed",
            r#"{"anyOf":[{"type":"string"},{"type":"integer"}]}"#,
            r#"{"anyOf":[{"type":"string"}]}"#,
            Backward,
            vec!["COMBINATOR_CHANGED"],
        ),
    ];
    for (name, v1, v2, mode, want) in cases {
        assert_eq!(rules(j, &[v1, v2], mode), want, "{name} ({mode})");
    }
    // Removed from an open model, then re-added with another type. Unlike Protobuf and Avro,
    // the plain mode already refuses the re-add (the open model let writers of the previous
    // version put anything there); the transitive mode adds the conflict with version 1.
    let v2 = r#"{"type":"object","properties":{"id":{"type":"string"}},"required":["id"]}"#;
    let v3 = r#"{"type":"object","properties":{"id":{"type":"string"},"qty":{"type":"string"}},"required":["id"]}"#;
    assert!(rules(j, &[JSON_OPEN, v2], Backward).is_empty());
    assert_eq!(
        rules(j, &[JSON_OPEN, v2, v3], Backward),
        vec!["PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL"]
    );
    let transitive = rules(j, &[JSON_OPEN, v2, v3], BackwardTransitive);
    assert!(
        transitive.contains(&"PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL")
            && transitive.contains(&"TYPE_CHANGED"),
        "{transitive:?}"
    );
    // Identical versions are compatible in every mode, and a recursive definition ends.
    let tree = r##"{"$defs":{"n":{"type":"object","properties":{"kids":{"type":"array","items":{"$ref":"#/$defs/n"}}}}},"$ref":"#/$defs/n"}"##;
    for mode in [
        Backward,
        Forward,
        Full,
        BackwardTransitive,
        ForwardTransitive,
        FullTransitive,
    ] {
        assert!(rules(j, &[JSON_CLOSED, JSON_CLOSED], mode).is_empty());
        assert!(rules(j, &[tree, tree, tree], mode).is_empty());
    }
}

#[test]
fn json_payloads() {
    let s = compile(SchemaKind::Json, JSON_CLOSED);
    assert_eq!(s.validate(br#"{"id":"a","qty":3}"#), Ok(()));
    let e = s.validate(br#"{"id":"a","qty":"three"}"#).unwrap_err();
    assert_eq!(e.path, "/qty");
    let e = s.validate(br#"{"qty":3}"#).unwrap_err();
    assert!(e.rule.contains("id"), "{e}");
    let e = s.validate(b"\x00\x01binary").unwrap_err();
    assert!(e.rule.starts_with("not a JSON document"), "{e}");
    // Valid JSON, nested past the limit.
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let e = s.validate(deep.as_bytes()).unwrap_err();
    assert!(e.rule.contains("deeper than 64"), "{e}");
    // The message does not echo the payload's values (they may be personal data).
    let e = s
        .validate(br#"{"id":"a","qty":"secret-value"}"#)
        .unwrap_err();
    assert!(!e.to_string().contains("secret-value"), "{e}");
}

#[test]
fn json_schemas_that_do_not_compile() {
    let err =
        |text: &str| Schema::compile(SchemaKind::Json, text, None, Limits::default()).unwrap_err();
    assert!(matches!(err("{not json"), SchemaError::Parse { .. }));
    assert_eq!(
        err(r#"{"properties":{"a":{"$ref":"https://example.com/a.json"}}}"#),
        SchemaError::RemoteRef("https://example.com/a.json".to_owned())
    );
    assert_eq!(
        err(r#"{"$ref":"other.json#/x"}"#),
        SchemaError::RemoteRef("other.json#/x".to_owned())
    );
    assert!(matches!(
        err(r#"{"type":"no-such-type"}"#),
        SchemaError::Parse { .. }
    ));
    let huge = format!(r#"{{"description":"{}"}}"#, "x".repeat(2 << 20));
    assert!(matches!(err(&huge), SchemaError::TooLarge { .. }));
    let deep = format!("{}{{}}{}", r#"{"items":"#.repeat(80), "}".repeat(80));
    assert_eq!(err(&deep), SchemaError::TooDeep { limit: 64 });
}

// ---------- Avro ----------

const AVRO_V1: &str = r#"{"type":"record","name":"Order","fields":[{"name":"id","type":"string"},{"name":"qty","type":"int"}]}"#;

fn avro(fields: &str) -> String {
    format!(r#"{{"type":"record","name":"Order","fields":[{fields}]}}"#)
}

#[test]
fn avro_compatibility_table() {
    let a = SchemaKind::Avro;
    let id = r#"{"name":"id","type":"string"}"#;
    let cases: Vec<(&str, String, CompatibilityMode, usize)> = vec![
        (
            "add a field with a default",
            avro(&format!(
                r#"{id},{{"name":"qty","type":"int"}},{{"name":"note","type":"string","default":""}}"#
            )),
            Full,
            0,
        ),
        (
            "add a field without a default",
            avro(&format!(
                r#"{id},{{"name":"qty","type":"int"}},{{"name":"note","type":"string"}}"#
            )),
            Backward,
            1,
        ),
        (
            "... which old readers ignore",
            avro(&format!(
                r#"{id},{{"name":"qty","type":"int"}},{{"name":"note","type":"string"}}"#
            )),
            Forward,
            0,
        ),
        ("remove a field", avro(id), Backward, 0),
        ("... which old readers need", avro(id), Forward, 1),
        (
            "promote int to long",
            avro(&format!(r#"{id},{{"name":"qty","type":"long"}}"#)),
            Backward,
            0,
        ),
        (
            "... which old readers cannot narrow",
            avro(&format!(r#"{id},{{"name":"qty","type":"long"}}"#)),
            Forward,
            1,
        ),
        (
            "change a field's type",
            avro(&format!(r#"{id},{{"name":"qty","type":"string"}}"#)),
            Backward,
            1,
        ),
    ];
    for (name, v2, mode, n) in cases {
        let got = rules(a, &[AVRO_V1, &v2], mode);
        assert_eq!(got.len(), n, "{name} ({mode}): {got:?}");
        assert!(got.iter().all(|r| *r == "AVRO_RESOLUTION_FAILS"));
    }
    // Removed, then re-added with another type (and a default): only the transitive check
    // sees the conflict with version 1.
    let v2 = avro(id);
    let v3 = avro(&format!(
        r#"{id},{{"name":"qty","type":"string","default":""}}"#
    ));
    assert!(rules(a, &[AVRO_V1, &v2, &v3], Backward).is_empty());
    assert_eq!(rules(a, &[AVRO_V1, &v2, &v3], BackwardTransitive).len(), 1);
}

#[test]
fn avro_payloads() {
    let s = compile(SchemaKind::Avro, AVRO_V1);
    // "ab" (zigzag length 2), qty 3 (zigzag 6)
    assert_eq!(s.validate(&[0x04, b'a', b'b', 0x06]), Ok(()));
    let e = s.validate(&[0x04, b'a', b'b', 0x06, 0x00]).unwrap_err();
    assert!(e.rule.contains("1 bytes are left"), "{e}");
    assert!(s.validate(&[0x04, b'a']).is_err(), "truncated");
    assert!(s.validate(&[]).is_err(), "empty");
}

#[test]
fn avro_schemas_that_do_not_compile() {
    let err =
        |text: &str| Schema::compile(SchemaKind::Avro, text, None, Limits::default()).unwrap_err();
    assert!(matches!(
        err(r#"{"type":"recrod"}"#),
        SchemaError::Parse { .. }
    ));
    let e =
        err(r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#);
    assert!(e.to_string().contains("contains itself"), "{e}");
    let e = err(&avro(r#"{"name":"qty","type":"int","default":"many"}"#));
    assert!(matches!(e, SchemaError::Parse { .. }), "{e}");
}

#[test]
fn kinds_and_modes_parse_and_a_kind_change_is_refused() {
    for k in SchemaKind::ALL {
        assert_eq!(k.as_str().parse::<SchemaKind>(), Ok(k));
    }
    for m in CompatibilityMode::ALL {
        assert_eq!(m.as_str().parse::<CompatibilityMode>(), Ok(m));
    }
    assert_eq!("full-transitive".parse(), Ok(FullTransitive));
    assert!("xml".parse::<SchemaKind>().is_err());
    assert!("SIDEWAYS".parse::<CompatibilityMode>().is_err());
    let j = compile(SchemaKind::Json, JSON_CLOSED);
    let a = compile(SchemaKind::Avro, AVRO_V1);
    let v = check(&a, &[(1, &j)], CompatibilityMode::Backward).unwrap_err();
    assert_eq!(v[0].rule, "SCHEMA_TYPE_CHANGED");
    assert!(check(&a, &[(1, &j)], CompatibilityMode::None).is_ok());
    assert!(check(&a, &[], CompatibilityMode::FullTransitive).is_ok());
}

// ---------- Generated documents ----------

/// A document valid for [`ORDER_SCHEMA`], drawn from `rng`.
fn order_doc(rng: &mut junction_testkit::SplitMix) -> serde_json::Value {
    use serde_json::json;
    let n_items = 1 + rng.below(4);
    let items: Vec<serde_json::Value> = (0..n_items)
        .map(|i| {
            json!({
                "sku": format!("SKU-{}", rng.below(10_000)),
                "qty": 1 + rng.below(99),
                "price": (rng.below(100_000) as f64) / 100.0 + (i as f64),
            })
        })
        .collect();
    let status = ["new", "paid", "shipped"][rng.below(3) as usize];
    let mut doc = json!({
        "id": format!("o-{}", rng.below(1 << 20)),
        "status": status,
        "items": items,
    });
    if rng.below(2) == 0 {
        doc["note"] = json!("x".repeat(rng.below(40) as usize));
    }
    doc
}

const ORDER_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "id": {"type": "string", "minLength": 1},
    "status": {"enum": ["new", "paid", "shipped"]},
    "note": {"type": "string", "maxLength": 40},
    "items": {
      "type": "array", "minItems": 1,
      "items": {
        "type": "object",
        "properties": {
          "sku": {"type": "string", "pattern": "^SKU-[0-9]+$"},
          "qty": {"type": "integer", "minimum": 1, "maximum": 99},
          "price": {"type": "number", "minimum": 0}
        },
        "required": ["sku", "qty"],
        "additionalProperties": false
      }
    }
  },
  "required": ["id", "status", "items"],
  "additionalProperties": false
}"#;

#[test]
fn generated_documents_pass_and_each_mutation_is_refused_at_its_path() {
    use serde_json::json;
    let schema = compile(SchemaKind::Json, ORDER_SCHEMA);
    for seed in 0..300 {
        let mut rng = junction_testkit::SplitMix(seed);
        let doc = order_doc(&mut rng);
        let bytes = serde_json::to_vec(&doc).expect("encode");
        assert_eq!(schema.validate(&bytes), Ok(()), "seed {seed}: {doc}");
        // One mutation, each breaking exactly one rule, and where it must be reported.
        let i = rng.below(doc["items"].as_array().map_or(1, |a| a.len() as u64));
        let mut bad = doc.clone();
        let want_path = match rng.below(7) {
            0 => {
                bad.as_object_mut().map(|o| o.remove("id"));
                String::new()
            }
            1 => {
                bad["status"] = json!("lost");
                "/status".to_owned()
            }
            2 => {
                bad["items"][i as usize]["qty"] = json!(100);
                format!("/items/{i}/qty")
            }
            3 => {
                bad["items"][i as usize]["qty"] = json!("3");
                format!("/items/{i}/qty")
            }
            4 => {
                bad["items"][i as usize]["sku"] = json!("sku-1");
                format!("/items/{i}/sku")
            }
            5 => {
                bad["items"][i as usize]["colour"] = json!("red");
                format!("/items/{i}")
            }
            _ => {
                bad["items"] = json!([]);
                "/items".to_owned()
            }
        };
        let bytes = serde_json::to_vec(&bad).expect("encode");
        let e = schema
            .validate(&bytes)
            .expect_err(&format!("seed {seed}: accepted {bad}"));
        assert_eq!(e.path, want_path, "seed {seed}: {e} for {bad}");
    }
}

#[test]
fn payloads_decode_to_json() {
    let p = compile(SchemaKind::Protobuf, PROTO_V1);
    let good = [0x0a, 0x01, b'a', 0x10, 0x05, 0x1a, 0x03, 0x0a, 0x01, b'x'];
    assert_eq!(
        p.to_json(&good).expect("decodes"),
        serde_json::json!({"id": "a", "qty": 5, "item": {"sku": "x"}})
    );
    assert!(p.to_json(&[0x0a, 0x05, b'a']).is_err(), "truncated");

    let a = compile(SchemaKind::Avro, AVRO_V1);
    assert_eq!(
        a.to_json(&[0x04, b'a', b'b', 0x06]).expect("decodes"),
        serde_json::json!({"id": "ab", "qty": 3})
    );
    assert!(a.to_json(&[0x04, b'a', b'b', 0x06, 0x00]).is_err());

    let j = compile(SchemaKind::Json, r#"{"type":"object"}"#);
    assert_eq!(
        j.to_json(br#"{"n":1}"#).expect("decodes"),
        serde_json::json!({"n": 1})
    );
    assert!(j.to_json(b"\xff").is_err());
}

// ---------- Property tests of the binary formats against reference readers ----------
//
// Each reference is a small wire-format reader written here from the format's specification
// for one fixed schema, independent of the libraries the validator uses. Generated records
// always pass; randomly mutated ones (a byte changed, inserted or removed, a cut) must be
// accepted exactly when the reference accepts them.

/// A base-128 varint as Protobuf reads it: at most 10 bytes, the 10th at most 1.
fn pb_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for i in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        if i == 9 && b >= 0x02 {
            return None;
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Whether `buf` is a valid `shop.Order` (or, with `item`, `shop.Item`) of `PROTO_V1`:
/// every field known, with its wire type, lengths in bounds, strings UTF-8.
fn pb_reference(buf: &[u8], item: bool) -> bool {
    enum K {
        Str,
        Int,
        Msg,
    }
    let mut pos = 0;
    while pos < buf.len() {
        let Some(key) = pb_varint(buf, &mut pos) else {
            return false;
        };
        if key > u64::from(u32::MAX) || key >> 3 == 0 || key & 7 > 5 {
            return false;
        }
        let kind = match (item, key >> 3) {
            (true, 1) | (false, 1) => K::Str,
            (false, 2) => K::Int,
            (false, 3) => K::Msg,
            _ => return false,
        };
        let wire = key & 7;
        match kind {
            K::Int => {
                if wire != 0 || pb_varint(buf, &mut pos).is_none() {
                    return false;
                }
            }
            K::Str | K::Msg => {
                if wire != 2 {
                    return false;
                }
                let Some(len) = pb_varint(buf, &mut pos) else {
                    return false;
                };
                let Some(end) = usize::try_from(len).ok().and_then(|l| pos.checked_add(l)) else {
                    return false;
                };
                let Some(body) = buf.get(pos..end) else {
                    return false;
                };
                pos = end;
                let ok = match kind {
                    K::Str => std::str::from_utf8(body).is_ok(),
                    _ => pb_reference(body, true),
                };
                if !ok {
                    return false;
                }
            }
        }
    }
    true
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn random_text(rng: &mut junction_testkit::SplitMix) -> String {
    let alphabet = ["a", "Z", "7", "-", " ", "é", "日", "🦀"];
    (0..rng.below(12))
        .map(|_| alphabet[rng.below(alphabet.len() as u64) as usize])
        .collect()
}

/// Changes one thing about `bytes`.
fn mutate(rng: &mut junction_testkit::SplitMix, bytes: &mut Vec<u8>) {
    let at = rng.below(bytes.len() as u64 + 1) as usize;
    let byte = rng.below(256) as u8;
    match rng.below(4) {
        0 if at < bytes.len() => bytes[at] = byte,
        1 => bytes.insert(at, byte),
        2 if at < bytes.len() => {
            bytes.remove(at);
        }
        _ => bytes.truncate(at),
    }
}

/// Generates `seeds` records with `generate`, each valid for both `schema` and `reference`,
/// mutates each once or twice, and asserts that `schema` accepts a mutant exactly when
/// `reference` does; both outcomes must occur often.
fn agrees_with_reference(
    schema: &Schema,
    seeds: u64,
    mut generate: impl FnMut(&mut junction_testkit::SplitMix) -> Vec<u8>,
    reference: impl Fn(&[u8]) -> bool,
) {
    let (mut accepted, mut refused) = (0, 0);
    for seed in 0..seeds {
        let mut rng = junction_testkit::SplitMix(seed);
        let rec = generate(&mut rng);
        assert!(
            reference(&rec),
            "seed {seed}: the reference refuses a generated record"
        );
        assert_eq!(schema.validate(&rec), Ok(()), "seed {seed}: {rec:02x?}");
        let mut bad = rec;
        for _ in 0..=rng.below(2) {
            mutate(&mut rng, &mut bad);
        }
        let got = schema.validate(&bad);
        assert_eq!(
            got.is_ok(),
            reference(&bad),
            "seed {seed}: {bad:02x?} gave {got:?}"
        );
        if got.is_ok() {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    assert!(
        accepted > 100 && refused > 100,
        "{accepted} accepted, {refused} refused"
    );
}

#[test]
fn protobuf_generated_records_pass_and_mutations_agree_with_a_reference_reader() {
    let schema = compile(SchemaKind::Protobuf, PROTO_V1);
    let generate = |rng: &mut junction_testkit::SplitMix| {
        let mut rec = Vec::new();
        // Fields in any order, some absent, some repeated (the last one wins).
        for _ in 0..rng.below(5) {
            match rng.below(3) {
                0 => {
                    let s = random_text(rng);
                    rec.push(0x0a);
                    put_varint(&mut rec, s.len() as u64);
                    rec.extend_from_slice(s.as_bytes());
                }
                1 => {
                    rec.push(0x10);
                    let v = rng.next_u64() as i32;
                    put_varint(&mut rec, i64::from(v) as u64);
                }
                _ => {
                    let sku = random_text(rng);
                    let mut item = vec![0x0a];
                    put_varint(&mut item, sku.len() as u64);
                    item.extend_from_slice(sku.as_bytes());
                    rec.push(0x1a);
                    put_varint(&mut rec, item.len() as u64);
                    rec.extend(item);
                }
            }
        }
        rec
    };
    agrees_with_reference(&schema, 3000, generate, |b| pb_reference(b, false));
}

/// A zig-zag varint as apache-avro reads it (at most 10 bytes; bits past 64 dropped).
fn avro_long(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let mut v = 0u64;
    for j in 0..10 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * j);
        if b < 0x80 {
            return Some((v >> 1) as i64 ^ -((v & 1) as i64));
        }
    }
    None
}

/// Whether `buf` is exactly one datum of `AVRO_V1` (`id` string, `qty` int).
fn avro_reference(buf: &[u8]) -> bool {
    let mut pos = 0;
    let Some(len) = avro_long(buf, &mut pos) else {
        return false;
    };
    let Some(end) = usize::try_from(len).ok().and_then(|l| pos.checked_add(l)) else {
        return false;
    };
    let Some(id) = buf.get(pos..end) else {
        return false;
    };
    if std::str::from_utf8(id).is_err() {
        return false;
    }
    pos = end;
    let Some(qty) = avro_long(buf, &mut pos) else {
        return false;
    };
    i32::try_from(qty).is_ok() && pos == buf.len()
}

#[test]
fn avro_generated_records_pass_and_mutations_agree_with_a_reference_reader() {
    let schema = compile(SchemaKind::Avro, AVRO_V1);
    let zigzag = |v: i64| ((v << 1) ^ (v >> 63)) as u64;
    let generate = |rng: &mut junction_testkit::SplitMix| {
        let id = random_text(rng);
        let mut rec = Vec::new();
        put_varint(&mut rec, zigzag(id.len() as i64));
        rec.extend_from_slice(id.as_bytes());
        put_varint(&mut rec, zigzag(i64::from(rng.next_u64() as i32)));
        rec
    };
    agrees_with_reference(&schema, 3000, generate, avro_reference);
}

const RICH_PROTO: &str = r#"syntax = "proto3";
package rich;
enum Colour { RED = 0; GREEN = 1; BLUE = 2; }
message Inner { string s = 1; repeated int32 nums = 2; Inner child = 3; bytes raw = 4; }
message Rich {
  int32 i32 = 1; int64 i64 = 2; uint32 u32 = 3; uint64 u64 = 4; sint32 s32 = 5; sint64 s64 = 6;
  bool b = 7; fixed32 f32 = 8; fixed64 f64 = 9; sfixed32 sf32 = 10; sfixed64 sf64 = 11;
  float fl = 12; double db = 13; string str = 14; bytes by = 15; Colour colour = 16;
  Inner inner = 17; repeated Inner inners = 18; repeated int64 packed = 19;
  repeated fixed32 pf = 20; map<string, Inner> by_name = 21; map<int32, string> labels = 22;
  repeated string tags = 23; repeated double pd = 26;
  oneof choice { string a = 24; Inner b_inner = 25; }
}
"#;

/// A random message of `desc`, nested at most `depth` more levels.
fn random_message(
    rng: &mut junction_testkit::SplitMix,
    desc: &prost_reflect::MessageDescriptor,
    depth: u32,
) -> prost_reflect::DynamicMessage {
    use prost_reflect::{DynamicMessage, Kind, MapKey, Value};
    fn scalar(rng: &mut junction_testkit::SplitMix, kind: &Kind, depth: u32) -> Option<Value> {
        let x = rng.next_u64();
        Some(match kind {
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(x as i32),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(x as i64),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(x as u32),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(x),
            Kind::Bool => Value::Bool(x & 1 == 1),
            Kind::Float => Value::F32(f32::from_bits(x as u32)),
            Kind::Double => Value::F64(f64::from_bits(x)),
            Kind::String => Value::String(random_text(rng)),
            Kind::Bytes => Value::Bytes(
                (0..x % 9)
                    .map(|i| (x >> i) as u8)
                    .collect::<Vec<_>>()
                    .into(),
            ),
            Kind::Enum(_) => Value::EnumNumber((x % 4) as i32),
            Kind::Message(m) => {
                if depth == 0 {
                    return None;
                }
                Value::Message(random_message(rng, m, depth - 1))
            }
        })
    }
    let mut msg = DynamicMessage::new(desc.clone());
    for field in desc.fields() {
        if rng.below(2) == 0 {
            continue;
        }
        let kind = field.kind();
        let value = if field.is_map() {
            let Kind::Message(entry) = &kind else {
                continue;
            };
            let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
            let mut map = std::collections::HashMap::new();
            for _ in 0..rng.below(3) {
                let key = match scalar(rng, &kf.kind(), 0) {
                    Some(Value::String(s)) => MapKey::String(s),
                    Some(Value::I32(i)) => MapKey::I32(i),
                    _ => continue,
                };
                if let Some(v) = scalar(rng, &vf.kind(), depth) {
                    map.insert(key, v);
                }
            }
            Value::Map(map)
        } else if field.is_list() {
            let items: Vec<Value> = (0..rng.below(4))
                .filter_map(|_| scalar(rng, &kind, depth))
                .collect();
            Value::List(items)
        } else {
            match scalar(rng, &kind, depth) {
                Some(v) => v,
                None => continue,
            }
        };
        msg.set_field(&field, value);
    }
    msg
}

#[test]
fn the_wire_walk_accepts_exactly_what_decoding_accepts() {
    use prost::Message as _;
    let schema = compile(SchemaKind::Protobuf, RICH_PROTO);
    let Compiled::Proto(c) = &schema.compiled else {
        panic!("a protobuf schema");
    };
    assert!(c.walkable);
    let desc = c.message.clone();
    let max_depth = Limits::default().max_depth;
    agrees_with_reference(
        &schema,
        4000,
        |rng| random_message(rng, &desc, 3).encode_to_vec(),
        |b| c.validate_by_decoding(b, max_depth).is_ok(),
    );
}
