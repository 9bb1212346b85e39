//! The schema registry's operations and the node's cache of compiled schemas.
//!
//! Registering runs on the controller: it compiles the new version, checks it against the
//! earlier versions under the schema's compatibility mode (`junction-schema`, pure), and only
//! then proposes it, naming the latest version it checked against. If another registration
//! got in between, the metadata refuses with a conflict and the check runs again on the new
//! history. So the Raft log holds only versions that passed the check, and apply never runs a
//! parser.
//!
//! Every node compiles each version it validates with once and keeps it (`SchemaCache`), so
//! produce pays only for validation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use junction_schema::{Limits, Schema};
use junction_types::schema::{
    Compatibility, NewVersion, Registered, SchemaBinding, SchemaRegistryError, SchemaType,
};
use junction_types::{CommandResponse, MetaCommand, StationName};
use parking_lot::Mutex;

use crate::partition::now_ms;
use crate::{Broker, BrokerError};

/// Most compiled versions kept per node (a simple bound: the cache is emptied when full).
const CACHE_MAX: usize = 1024;
/// How often the controller re-runs a check that lost a race with another registration.
const CONFLICT_RETRIES: usize = 5;

/// Why a payload was refused: which message of the batch, where in it, and what rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidMessage {
    /// `name@version` of the schema.
    pub schema: String,
    /// The message's index in the produce request.
    pub index: usize,
    pub path: String,
    pub rule: String,
}

impl std::fmt::Display for InvalidMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "message {} is not valid for schema {}: {}: {}",
            self.index,
            self.schema,
            if self.path.is_empty() {
                "<message>"
            } else {
                &self.path
            },
            self.rule
        )
    }
}

/// Compiled schema versions of this node, by (tenant, name, version).
#[derive(Default)]
pub struct SchemaCache {
    compiled: Mutex<HashMap<(String, String, u32), Arc<Schema>>>,
}

/// The schema a station validates with, compiled.
#[derive(Clone)]
pub struct StationSchema {
    pub binding: SchemaBinding,
    pub version: u32,
    pub schema: Arc<Schema>,
    /// Longest one message's validation may take.
    pub max_validation: Duration,
}

impl StationSchema {
    /// `name@version`, the value of the header validated messages carry.
    pub fn label(&self) -> String {
        format!("{}@{}", self.binding.schema, self.version)
    }

    /// Validates one payload (message `index` of its batch).
    pub fn validate(&self, index: usize, payload: &[u8]) -> Result<(), InvalidMessage> {
        let started = Instant::now();
        let result = self.schema.validate(payload);
        let took = started.elapsed();
        let invalid = |path: String, rule: String| InvalidMessage {
            schema: self.label(),
            index,
            path,
            rule,
        };
        match result {
            Err(e) => Err(invalid(e.path, e.rule)),
            // A message that is valid but took too long is refused all the same: a schema
            // whose validation can run away (a pathological pattern) must not stall a node.
            Ok(()) if took > self.max_validation => Err(invalid(
                String::new(),
                format!(
                    "validation took {} ms, more than the limit of {} ms",
                    took.as_millis(),
                    self.max_validation.as_millis()
                ),
            )),
            Ok(()) => Ok(()),
        }
    }
}

/// The limits every node compiles and validates with.
pub fn limits(max_message_bytes: u32) -> Limits {
    Limits {
        max_message_bytes: max_message_bytes as usize,
        ..Limits::default()
    }
}

/// Compiles a schema, mapping a failure to `InvalidSchema`.
pub fn compile(
    kind: SchemaType,
    text: &str,
    message: Option<&str>,
    max_message_bytes: u32,
) -> Result<Schema, BrokerError> {
    Schema::compile(kind, text, message, limits(max_message_bytes))
        .map_err(|e| BrokerError::InvalidSchema(e.to_string()))
}

/// What a compatibility check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    /// The text is already registered as this version.
    Existing(u32),
    /// It would be registered as the next version.
    Compatible { latest: Option<u32> },
}

impl Broker {
    fn compiled(
        &self,
        tenant: &str,
        name: &str,
        kind: SchemaType,
        v: &junction_types::schema::SchemaVersion,
    ) -> Result<Arc<Schema>, BrokerError> {
        let key = (tenant.to_owned(), name.to_owned(), v.version);
        if let Some(s) = self.schema_cache.compiled.lock().get(&key) {
            return Ok(s.clone());
        }
        let s = Arc::new(compile(
            kind,
            &v.text,
            v.message.as_deref(),
            self.cfg.max_message_bytes,
        )?);
        let mut map = self.schema_cache.compiled.lock();
        if map.len() >= CACHE_MAX {
            map.clear();
        }
        map.insert(key, s.clone());
        Ok(s)
    }

    /// Checks `text` against the schema's history in this node's metadata without
    /// registering it: compiles, finds an identical version, or runs the compatibility check.
    pub fn check_schema(
        &self,
        tenant: &str,
        name: &str,
        kind: SchemaType,
        text: &str,
        message: Option<&str>,
    ) -> Result<CheckOutcome, BrokerError> {
        junction_types::schema::validate_name(name).map_err(|e| BrokerError::Meta(e.into()))?;
        let new = compile(kind, text, message, self.cfg.max_message_bytes)?;
        let meta = self.metadata();
        let Some(subject) = meta.schemas.get(tenant, name) else {
            return Ok(CheckOutcome::Compatible { latest: None });
        };
        if subject.kind != kind {
            return Err(BrokerError::Meta(
                SchemaRegistryError::KindMismatch {
                    name: name.to_owned(),
                    existing: subject.kind,
                    given: kind,
                }
                .into(),
            ));
        }
        if let Some(same) = subject
            .versions
            .values()
            .find(|v| v.text == text && v.message.as_deref() == message)
        {
            return Ok(CheckOutcome::Existing(same.version));
        }
        let earlier = subject
            .versions
            .values()
            .map(|v| Ok((v.version, self.compiled(tenant, name, kind, v)?)))
            .collect::<Result<Vec<_>, BrokerError>>()?;
        let refs: Vec<(u32, &Schema)> = earlier.iter().map(|(v, s)| (*v, s.as_ref())).collect();
        junction_schema::check(&new, &refs, subject.compatibility).map_err(|found| {
            BrokerError::IncompatibleSchema {
                name: name.to_owned(),
                mode: subject.compatibility,
                violations: found.iter().map(ToString::to_string).collect(),
            }
        })?;
        Ok(CheckOutcome::Compatible {
            latest: subject.latest().map(|v| v.version),
        })
    }

    /// Registers a version (the controller only): compiled, checked, then proposed.
    pub async fn register_schema(
        &self,
        tenant: &str,
        name: &str,
        kind: SchemaType,
        compatibility: Option<Compatibility>,
        text: &str,
        message: Option<&str>,
    ) -> Result<Registered, BrokerError> {
        self.ensure_controller()?;
        if !self.metadata().tenants.contains_key(tenant) {
            return Err(BrokerError::Meta(
                junction_types::MetaError::TenantNotFound {
                    tenant: tenant.to_owned(),
                },
            ));
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let expected_latest = match self.check_schema(tenant, name, kind, text, message)? {
                CheckOutcome::Existing(version) => {
                    let current = self
                        .metadata()
                        .schemas
                        .get(tenant, name)
                        .map(|s| s.compatibility);
                    if let Some(mode) = compatibility
                        && current != Some(mode)
                    {
                        // The text is known, but an explicit mode still applies.
                        self.set_schema_compatibility(tenant, name, mode).await?;
                    }
                    return Ok(Registered {
                        version,
                        existing: true,
                    });
                }
                CheckOutcome::Compatible { latest } => latest,
            };
            let cmd = MetaCommand::RegisterSchema {
                version: NewVersion {
                    tenant: tenant.to_owned(),
                    name: name.to_owned(),
                    kind,
                    compatibility: compatibility.unwrap_or_default(),
                    text: text.to_owned(),
                    message: message.map(str::to_owned),
                    expected_latest,
                    now_ms: now_ms(),
                },
            };
            match self.meta_write(cmd).await {
                Ok(CommandResponse::SchemaRegistered(r)) => {
                    if let (Some(mode), false) = (compatibility, expected_latest.is_none()) {
                        // An explicit mode given with a later version changes the schema's.
                        self.set_schema_compatibility(tenant, name, mode).await?;
                    }
                    return Ok(r);
                }
                Ok(other) => {
                    return Err(BrokerError::Raft(format!(
                        "unexpected schema result {other:?}"
                    )));
                }
                Err(BrokerError::Meta(junction_types::MetaError::Schema(e)))
                    if e.is_retryable() && attempt < CONFLICT_RETRIES =>
                {
                    // Another version got in: check again against the new history (this node
                    // applied it before the refusal reached us).
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Changes a schema's compatibility mode (the controller only).
    pub async fn set_schema_compatibility(
        &self,
        tenant: &str,
        name: &str,
        compatibility: Compatibility,
    ) -> Result<(), BrokerError> {
        self.ensure_controller()?;
        self.meta_write(MetaCommand::SetSchemaCompatibility {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            compatibility,
        })
        .await?;
        Ok(())
    }

    /// Deletes a version, or the whole schema (the controller only).
    pub async fn delete_schema(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<(), BrokerError> {
        self.ensure_controller()?;
        self.meta_write(MetaCommand::DeleteSchema {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            version,
        })
        .await?;
        self.schema_cache
            .compiled
            .lock()
            .retain(|(t, n, v), _| !(t == tenant && n == name && version.is_none_or(|d| d == *v)));
        Ok(())
    }

    /// Binds a station to a schema of its tenant, or detaches it (the controller only).
    pub async fn bind_schema(
        &self,
        station: &StationName,
        binding: Option<SchemaBinding>,
    ) -> Result<(), BrokerError> {
        self.ensure_controller()?;
        if binding
            .as_ref()
            .is_some_and(|b| b.on_invalid == junction_types::schema::OnInvalid::DeadLetter)
        {
            self.try_dead_letter_station(station).await;
        }
        self.meta_write(MetaCommand::BindSchema {
            station: station.full(),
            binding,
        })
        .await?;
        Ok(())
    }

    /// The compiled schema a station's produces are validated with, per this node's metadata
    /// (`None`: the station has no schema).
    pub fn station_schema(&self, station: &str) -> Result<Option<StationSchema>, BrokerError> {
        let meta = self.metadata();
        let Some((binding, kind, v)) = meta.schemas.resolve(station) else {
            return Ok(None);
        };
        let tenant = junction_types::schema::station_tenant(station);
        let schema = self.compiled(tenant, &binding.schema, kind, v)?;
        Ok(Some(StationSchema {
            binding: binding.clone(),
            version: v.version,
            schema,
            max_validation: self.cfg.schema_validation_limit,
        }))
    }
}

impl Broker {
    /// Appends a produce's invalid messages to `station`'s dead-letter station, in order;
    /// resolves once each is committed. Dead letters are at-least-once: a producer's retry of
    /// a batch whose dead letters were stored but whose reply was lost stores them again.
    pub async fn append_dead_letters(
        &self,
        station: &str,
        records: Vec<junction_types::Record>,
    ) -> Result<(), BrokerError> {
        let sink = self.dead_letter_sink().ok_or_else(|| {
            BrokerError::Unavailable("this node cannot write dead letters yet".to_owned())
        })?;
        let dls = junction_types::groups::dead_letter_station(station);
        for r in records {
            sink.append(dls.clone(), r).await?;
        }
        Ok(())
    }
}
