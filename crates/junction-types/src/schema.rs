//! The schema registry as the metadata group keeps it: per tenant, named schemas with
//! immutable numbered versions and a compatibility mode, and which station is bound to which
//! schema.
//!
//! Compiling schemas and checking compatibility is the `junction-schema` crate's job and runs
//! on the controller *before* it proposes a new version (so apply never depends on a parser's
//! behaviour, which could differ between builds during a rolling upgrade). Apply only checks
//! what is deterministic: names, kinds, that nobody registered another version in between
//! (`expected_latest`, an optimistic check the controller retries on), identical
//! re-registrations, and that nothing in use is deleted.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most versions one schema keeps.
pub const MAX_VERSIONS: usize = 1000;
/// Header on every message validated against a schema: `name@version`.
pub const SCHEMA_HEADER: &str = "junction-schema";

/// The schema languages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SchemaType {
    Protobuf,
    Json,
    Avro,
}

impl SchemaType {
    pub const ALL: [SchemaType; 3] = [SchemaType::Protobuf, SchemaType::Json, SchemaType::Avro];

    pub fn as_str(self) -> &'static str {
        match self {
            SchemaType::Protobuf => "protobuf",
            SchemaType::Json => "json",
            SchemaType::Avro => "avro",
        }
    }
}

impl fmt::Display for SchemaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchemaType {
    type Err = SchemaRegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "protobuf" | "proto" => Ok(SchemaType::Protobuf),
            "json" | "json-schema" | "jsonschema" => Ok(SchemaType::Json),
            "avro" => Ok(SchemaType::Avro),
            other => Err(SchemaRegistryError::UnknownType {
                name: other.to_owned(),
            }),
        }
    }
}

/// Which earlier versions a new version must be compatible with (the Confluent registry's
/// modes and meanings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Compatibility {
    #[default]
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
    None,
}

impl Compatibility {
    pub const ALL: [Compatibility; 7] = [
        Compatibility::Backward,
        Compatibility::BackwardTransitive,
        Compatibility::Forward,
        Compatibility::ForwardTransitive,
        Compatibility::Full,
        Compatibility::FullTransitive,
        Compatibility::None,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Compatibility::Backward => "BACKWARD",
            Compatibility::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Compatibility::Forward => "FORWARD",
            Compatibility::ForwardTransitive => "FORWARD_TRANSITIVE",
            Compatibility::Full => "FULL",
            Compatibility::FullTransitive => "FULL_TRANSITIVE",
            Compatibility::None => "NONE",
        }
    }
}

impl fmt::Display for Compatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compatibility {
    type Err = SchemaRegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_uppercase().replace('-', "_");
        Compatibility::ALL
            .into_iter()
            .find(|m| m.as_str() == norm)
            .ok_or_else(|| SchemaRegistryError::UnknownCompatibility { name: s.to_owned() })
    }
}

/// What a station does with a message that fails validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OnInvalid {
    /// The whole batch fails with INVALID_ARGUMENT; nothing of it is stored.
    #[default]
    Reject,
    /// The message goes to the station's dead-letter station with the reason in a header; the
    /// rest of the batch is stored.
    DeadLetter,
}

impl OnInvalid {
    pub fn as_str(self) -> &'static str {
        match self {
            OnInvalid::Reject => "reject",
            OnInvalid::DeadLetter => "dead_letter",
        }
    }
}

impl FromStr for OnInvalid {
    type Err = SchemaRegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "reject" => Ok(OnInvalid::Reject),
            "dead_letter" | "dls" => Ok(OnInvalid::DeadLetter),
            other => Err(SchemaRegistryError::UnknownOnInvalid {
                name: other.to_owned(),
            }),
        }
    }
}

/// One immutable version of a schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaVersion {
    pub version: u32,
    /// The schema text as registered.
    pub text: String,
    /// Protobuf: the message type of the payloads (`None`: the file's first message).
    pub message: Option<String>,
    pub created_ms: i64,
}

/// A named schema of a tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaSubject {
    pub kind: SchemaType,
    pub compatibility: Compatibility,
    /// Live versions by number (deleted ones are gone; numbers are never reused).
    pub versions: BTreeMap<u32, SchemaVersion>,
    /// The number the next version gets.
    pub next_version: u32,
}

impl SchemaSubject {
    /// The newest live version.
    pub fn latest(&self) -> Option<&SchemaVersion> {
        self.versions.values().next_back()
    }
}

/// A station's schema: which schema, which version, and the policy for invalid messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchemaBinding {
    /// A schema of the station's tenant.
    pub schema: String,
    /// A fixed version, or `None` for the latest (which follows new registrations).
    pub version: Option<u32>,
    pub on_invalid: OnInvalid,
}

impl fmt::Display for SchemaBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.version {
            Some(v) => write!(f, "{}@{v}", self.schema),
            None => write!(f, "{}@latest", self.schema),
        }
    }
}

/// Why the registry refused a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaRegistryError {
    #[error("schema '{name}' of tenant '{tenant}' does not exist")]
    NotFound { tenant: String, name: String },
    #[error("schema '{name}' of tenant '{tenant}' has no version {version}")]
    VersionNotFound {
        tenant: String,
        name: String,
        version: u32,
    },
    #[error(
        "schema '{name}' is a {existing} schema; a {given} version cannot be added (create a schema with another name)"
    )]
    KindMismatch {
        name: String,
        existing: SchemaType,
        given: SchemaType,
    },
    #[error(
        "schema '{name}' changed while this version was checked (latest is now {latest:?}); retry"
    )]
    Conflict { name: String, latest: Option<u32> },
    #[error("schema '{name}' {what} is used by station(s) {stations}; detach them first")]
    InUse {
        name: String,
        what: String,
        stations: String,
    },
    #[error("schema '{name}' has {MAX_VERSIONS} versions, the most kept; delete old ones first")]
    TooManyVersions { name: String },
    #[error("schema name '{name}' is not valid: {reason}")]
    BadName { name: String, reason: String },
    #[error("unknown schema type '{name}' (use protobuf, json or avro)")]
    UnknownType { name: String },
    #[error(
        "unknown compatibility mode '{name}' (use BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE or NONE)"
    )]
    UnknownCompatibility { name: String },
    #[error("unknown on-invalid policy '{name}' (use reject or dead_letter)")]
    UnknownOnInvalid { name: String },
}

impl SchemaRegistryError {
    /// Whether retrying the same call may succeed (a concurrent registration).
    pub fn is_retryable(&self) -> bool {
        matches!(self, SchemaRegistryError::Conflict { .. })
    }
}

/// What registering a version did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    pub version: u32,
    /// The same text was already registered: that version is returned, nothing added.
    pub existing: bool,
}

/// A request to add a version (as the controller proposes it, after its compatibility check).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewVersion {
    pub tenant: String,
    pub name: String,
    pub kind: SchemaType,
    /// The mode of a new schema (ignored for an existing one; see `SetCompatibility`).
    pub compatibility: Compatibility,
    pub text: String,
    pub message: Option<String>,
    /// The latest version the controller checked against (`None`: the schema did not exist).
    pub expected_latest: Option<u32>,
    pub now_ms: i64,
}

/// Validates a schema name: 1–128 characters of `[A-Za-z0-9._-]`.
pub fn validate_name(name: &str) -> Result<(), SchemaRegistryError> {
    let bad = |reason: &str| {
        Err(SchemaRegistryError::BadName {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if name.is_empty() || name.len() > 128 {
        return bad("use 1 to 128 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return bad("use letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Every tenant's schemas and the stations' bindings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SchemaRegistry {
    /// (tenant, name) → schema.
    pub subjects: BTreeMap<(String, String), SchemaSubject>,
    /// Station (`tenant/name`) → its schema.
    pub bindings: BTreeMap<String, SchemaBinding>,
}

impl SchemaRegistry {
    pub fn get(&self, tenant: &str, name: &str) -> Option<&SchemaSubject> {
        self.subjects.get(&(tenant.to_owned(), name.to_owned()))
    }

    /// The schemas of a tenant, by name.
    pub fn of_tenant<'a>(
        &'a self,
        tenant: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a SchemaSubject)> + 'a {
        self.subjects
            .range((tenant.to_owned(), String::new())..)
            .take_while(move |((t, _), _)| t == tenant)
            .map(|((_, n), s)| (n.as_str(), s))
    }

    /// Adds a version (or returns the identical one already there).
    pub fn register(&mut self, v: &NewVersion) -> Result<Registered, SchemaRegistryError> {
        validate_name(&v.name)?;
        let key = (v.tenant.clone(), v.name.clone());
        let Some(subject) = self.subjects.get_mut(&key) else {
            if v.expected_latest.is_some() {
                return Err(SchemaRegistryError::Conflict {
                    name: v.name.clone(),
                    latest: None,
                });
            }
            let mut versions = BTreeMap::new();
            versions.insert(
                1,
                SchemaVersion {
                    version: 1,
                    text: v.text.clone(),
                    message: v.message.clone(),
                    created_ms: v.now_ms,
                },
            );
            self.subjects.insert(
                key,
                SchemaSubject {
                    kind: v.kind,
                    compatibility: v.compatibility,
                    versions,
                    next_version: 2,
                },
            );
            return Ok(Registered {
                version: 1,
                existing: false,
            });
        };
        if subject.kind != v.kind {
            return Err(SchemaRegistryError::KindMismatch {
                name: v.name.clone(),
                existing: subject.kind,
                given: v.kind,
            });
        }
        if let Some(same) = subject
            .versions
            .values()
            .find(|s| s.text == v.text && s.message == v.message)
        {
            return Ok(Registered {
                version: same.version,
                existing: true,
            });
        }
        let latest = subject.latest().map(|s| s.version);
        if latest != v.expected_latest {
            return Err(SchemaRegistryError::Conflict {
                name: v.name.clone(),
                latest,
            });
        }
        if subject.versions.len() >= MAX_VERSIONS {
            return Err(SchemaRegistryError::TooManyVersions {
                name: v.name.clone(),
            });
        }
        let version = subject.next_version;
        subject.next_version += 1;
        subject.versions.insert(
            version,
            SchemaVersion {
                version,
                text: v.text.clone(),
                message: v.message.clone(),
                created_ms: v.now_ms,
            },
        );
        Ok(Registered {
            version,
            existing: false,
        })
    }

    /// Changes a schema's compatibility mode (later registrations are checked with it).
    pub fn set_compatibility(
        &mut self,
        tenant: &str,
        name: &str,
        mode: Compatibility,
    ) -> Result<(), SchemaRegistryError> {
        let s = self
            .subjects
            .get_mut(&(tenant.to_owned(), name.to_owned()))
            .ok_or_else(|| not_found(tenant, name))?;
        s.compatibility = mode;
        Ok(())
    }

    /// Stations of `tenant` bound to `name`, and the version each pins (`None`: latest).
    pub fn users<'a>(
        &'a self,
        tenant: &'a str,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a str, Option<u32>)> + 'a {
        self.bindings.iter().filter_map(move |(station, b)| {
            (b.schema == name && station_tenant(station) == tenant)
                .then_some((station.as_str(), b.version))
        })
    }

    /// Deletes one version, or the whole schema (`version: None`). Refused while a station
    /// uses it: a station pinned to that version, or following the latest when the version is
    /// the latest (or the schema is deleted whole).
    pub fn delete(
        &mut self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<(), SchemaRegistryError> {
        let key = (tenant.to_owned(), name.to_owned());
        let subject = self
            .subjects
            .get(&key)
            .ok_or_else(|| not_found(tenant, name))?;
        let latest = subject.latest().map(|s| s.version);
        let blocking: Vec<&str> = match version {
            None => self.users(tenant, name).map(|(s, _)| s).collect(),
            Some(v) => {
                if !subject.versions.contains_key(&v) {
                    return Err(SchemaRegistryError::VersionNotFound {
                        tenant: tenant.to_owned(),
                        name: name.to_owned(),
                        version: v,
                    });
                }
                self.users(tenant, name)
                    .filter(|(_, pinned)| {
                        *pinned == Some(v) || (pinned.is_none() && latest == Some(v))
                    })
                    .map(|(s, _)| s)
                    .collect()
            }
        };
        if !blocking.is_empty() {
            return Err(SchemaRegistryError::InUse {
                name: name.to_owned(),
                what: version
                    .map_or_else(|| "(every version)".to_owned(), |v| format!("version {v}")),
                stations: blocking.join(", "),
            });
        }
        match version {
            None => {
                self.subjects.remove(&key);
            }
            Some(v) => {
                if let Some(s) = self.subjects.get_mut(&key) {
                    s.versions.remove(&v);
                    if s.versions.is_empty() {
                        self.subjects.remove(&key);
                    }
                }
            }
        }
        Ok(())
    }

    /// Binds a station (`tenant/name`) to a schema of its tenant, or detaches it (`None`).
    pub fn bind(
        &mut self,
        station: &str,
        binding: Option<SchemaBinding>,
    ) -> Result<(), SchemaRegistryError> {
        let Some(b) = binding else {
            self.bindings.remove(station);
            return Ok(());
        };
        self.check_binding(station_tenant(station), &b)?;
        self.bindings.insert(station.to_owned(), b);
        Ok(())
    }

    /// Checks that a binding names an existing schema (and version) of `tenant`.
    pub fn check_binding(
        &self,
        tenant: &str,
        b: &SchemaBinding,
    ) -> Result<(), SchemaRegistryError> {
        let subject = self
            .get(tenant, &b.schema)
            .ok_or_else(|| not_found(tenant, &b.schema))?;
        match b.version {
            Some(v) if !subject.versions.contains_key(&v) => {
                Err(SchemaRegistryError::VersionNotFound {
                    tenant: tenant.to_owned(),
                    name: b.schema.clone(),
                    version: v,
                })
            }
            _ => Ok(()),
        }
    }

    /// The schema version a station validates with now, and its binding.
    pub fn resolve(&self, station: &str) -> Option<(&SchemaBinding, SchemaType, &SchemaVersion)> {
        let b = self.bindings.get(station)?;
        let s = self.get(station_tenant(station), &b.schema)?;
        let v = match b.version {
            Some(v) => s.versions.get(&v)?,
            None => s.latest()?,
        };
        Some((b, s.kind, v))
    }

    /// Forgets a deleted station's binding.
    pub fn station_deleted(&mut self, station: &str) {
        self.bindings.remove(station);
    }
}

/// The tenant of a station's full name (`tenant/name`).
pub fn station_tenant(station: &str) -> &str {
    station.split_once('/').map_or(station, |(t, _)| t)
}

fn not_found(tenant: &str, name: &str) -> SchemaRegistryError {
    SchemaRegistryError::NotFound {
        tenant: tenant.to_owned(),
        name: name.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn v(name: &str, text: &str, expected: Option<u32>) -> NewVersion {
        NewVersion {
            tenant: "acme".into(),
            name: name.into(),
            kind: SchemaType::Json,
            compatibility: Compatibility::Backward,
            text: text.into(),
            message: None,
            expected_latest: expected,
            now_ms: 5,
        }
    }

    #[test]
    fn versions_count_up_identical_text_returns_the_existing_one_and_races_are_refused() {
        let mut r = SchemaRegistry::default();
        assert_eq!(
            r.register(&v("orders", "{}", None)).unwrap(),
            Registered {
                version: 1,
                existing: false
            }
        );
        assert_eq!(
            r.register(&v("orders", "{\"type\":\"object\"}", Some(1)))
                .unwrap(),
            Registered {
                version: 2,
                existing: false
            }
        );
        // Same text as version 1: that one, whatever the expectation.
        assert_eq!(
            r.register(&v("orders", "{}", Some(7))).unwrap(),
            Registered {
                version: 1,
                existing: true
            }
        );
        // Checked against version 1 while version 2 was added: a retryable conflict.
        let e = r.register(&v("orders", "{\"a\":1}", Some(1))).unwrap_err();
        assert_eq!(
            e,
            SchemaRegistryError::Conflict {
                name: "orders".into(),
                latest: Some(2)
            }
        );
        assert!(e.is_retryable());
        let mut avro = v("orders", "\"int\"", Some(2));
        avro.kind = SchemaType::Avro;
        assert!(matches!(
            r.register(&avro),
            Err(SchemaRegistryError::KindMismatch { .. })
        ));
        assert!(matches!(
            r.register(&v("bad name", "{}", None)),
            Err(SchemaRegistryError::BadName { .. })
        ));
        // Another tenant's schema of the same name is another schema.
        let mut other = v("orders", "{\"x\":1}", None);
        other.tenant = "globex".into();
        assert_eq!(r.register(&other).unwrap().version, 1);
        assert_eq!(r.of_tenant("acme").count(), 1);
    }

    #[test]
    fn what_a_station_uses_cannot_be_deleted() {
        let mut r = SchemaRegistry::default();
        r.register(&v("orders", "{}", None)).unwrap();
        r.register(&v("orders", "{\"a\":1}", Some(1))).unwrap();
        r.register(&v("orders", "{\"a\":2}", Some(2))).unwrap();
        let pin = |version| SchemaBinding {
            schema: "orders".into(),
            version,
            on_invalid: OnInvalid::Reject,
        };
        r.bind("acme/pinned", Some(pin(Some(1)))).unwrap();
        r.bind("acme/follows", Some(pin(None))).unwrap();
        assert!(matches!(
            r.bind("acme/x", Some(pin(Some(9)))),
            Err(SchemaRegistryError::VersionNotFound { version: 9, .. })
        ));
        assert!(matches!(
            r.bind("globex/x", Some(pin(None))),
            Err(SchemaRegistryError::NotFound { .. })
        ));
        assert_eq!(r.resolve("acme/follows").unwrap().2.version, 3);
        assert_eq!(r.resolve("acme/pinned").unwrap().2.version, 1);
        let e = r.delete("acme", "orders", Some(1)).unwrap_err();
        assert!(e.to_string().contains("acme/pinned"), "{e}");
        let e = r.delete("acme", "orders", Some(3)).unwrap_err();
        assert!(e.to_string().contains("acme/follows"), "{e}");
        assert!(r.delete("acme", "orders", None).is_err());
        r.delete("acme", "orders", Some(2)).unwrap();
        // Numbers are never reused.
        assert_eq!(
            r.register(&v("orders", "{\"b\":1}", Some(3)))
                .unwrap()
                .version,
            4
        );
        assert_eq!(r.resolve("acme/follows").unwrap().2.version, 4);
        r.bind("acme/pinned", None).unwrap();
        r.station_deleted("acme/follows");
        r.delete("acme", "orders", None).unwrap();
        assert!(r.get("acme", "orders").is_none());
        assert!(matches!(
            r.delete("acme", "orders", None),
            Err(SchemaRegistryError::NotFound { .. })
        ));
    }

    #[test]
    fn names_of_kinds_modes_and_policies_parse_and_print_alike() {
        for m in Compatibility::ALL {
            assert_eq!(m.as_str().parse::<Compatibility>().unwrap(), m);
        }
        assert_eq!(
            "full-transitive".parse::<Compatibility>().unwrap(),
            Compatibility::FullTransitive
        );
        for t in [SchemaType::Protobuf, SchemaType::Json, SchemaType::Avro] {
            assert_eq!(t.as_str().parse::<SchemaType>().unwrap(), t);
        }
        assert!("xml".parse::<SchemaType>().is_err());
        assert_eq!(
            "dead-letter".parse::<OnInvalid>().unwrap(),
            OnInvalid::DeadLetter
        );
        assert!("drop".parse::<OnInvalid>().is_err());
    }
}
