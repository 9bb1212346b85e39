//! `junction schema ...`: the schema registry.

use anyhow::Context;
use junction_client::SchemaSpec;
use junction_client::proto::SchemaInfo;
use serde_json::{Value, json};

use crate::common::{ConnArgs, Table, format_time_ms, out, out_json};

/// Register, check, list, describe and delete schemas; bind stations to them.
#[derive(clap::Args, Debug)]
pub struct SchemaArgs {
    #[command(subcommand)]
    pub command: SchemaCommand,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// A schema version from a file.
#[derive(clap::Args, Debug)]
pub struct VersionArgs {
    /// The schema's name (letters, digits, '.', '_', '-').
    pub name: String,
    /// protobuf, json or avro.
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: String,
    /// The schema text (a .proto file, a JSON Schema document, an Avro schema).
    #[arg(long, value_name = "PATH")]
    pub file: std::path::PathBuf,
    /// Protobuf: the payloads' message type [default: the file's first message].
    #[arg(long)]
    pub message: Option<String>,
    /// BACKWARD (default for a new schema), BACKWARD_TRANSITIVE, FORWARD,
    /// FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE or NONE.
    #[arg(long)]
    pub compatibility: Option<String>,
    /// The tenant [default: yours].
    #[arg(long, default_value = "")]
    pub tenant: String,
}

impl VersionArgs {
    fn spec(&self) -> anyhow::Result<SchemaSpec> {
        let text = std::fs::read_to_string(&self.file)
            .with_context(|| format!("reading --file {}", self.file.display()))?;
        let mut spec = SchemaSpec::new(&self.name, &self.kind, text);
        spec.tenant.clone_from(&self.tenant);
        spec.message.clone_from(&self.message);
        spec.compatibility.clone_from(&self.compatibility);
        Ok(spec)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum SchemaCommand {
    /// Register a version (creates the schema when it is new). Refused with the list of
    /// violations when it is not compatible with the earlier versions.
    ///
    /// Example: junction schema create orders --type protobuf --file orders.proto
    Create(VersionArgs),
    /// Check a version against the schema's history without registering it (exit status 1
    /// when incompatible).
    Check(VersionArgs),
    /// List a tenant's schemas.
    List {
        #[arg(long, default_value = "")]
        tenant: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a schema: its versions, mode, and the stations bound to it.
    Describe {
        name: String,
        /// Print this version's text.
        #[arg(long)]
        version: Option<u32>,
        #[arg(long, default_value = "")]
        tenant: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete one version, or the whole schema; refused while a station uses it.
    Delete {
        name: String,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Set a schema's compatibility mode.
    Compatibility {
        name: String,
        mode: String,
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Validate a station's messages against a schema: SCHEMA (latest version) or
    /// SCHEMA@VERSION.
    Attach {
        station: String,
        schema: String,
        /// reject (the batch fails) or dead_letter (the message goes to STATION.dls).
        #[arg(long, default_value = "reject")]
        on_invalid: String,
    },
    /// Stop validating a station's messages.
    Detach { station: String },
}

/// Parses `name` or `name@version` (`@latest` too).
pub(crate) fn schema_ref(s: &str) -> anyhow::Result<(String, Option<u32>)> {
    match s.split_once('@') {
        None => Ok((s.to_owned(), None)),
        Some((name, "latest")) => Ok((name.to_owned(), None)),
        Some((name, v)) => Ok((
            name.to_owned(),
            Some(
                v.parse()
                    .with_context(|| format!("'{v}' is not a version number (in '{s}')"))?,
            ),
        )),
    }
}

fn schema_json(s: &SchemaInfo) -> Value {
    json!({
        "tenant": s.tenant,
        "name": s.name,
        "type": s.r#type,
        "compatibility": s.compatibility,
        "versions": s.versions.iter().map(|v| json!({
            "version": v.version,
            "message": v.message,
            "created_at_ms": v.created_at_ms,
            "text": (!v.text.is_empty()).then_some(&v.text),
        })).collect::<Vec<_>>(),
        "stations": s.stations,
    })
}

pub(crate) async fn run(args: SchemaArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        SchemaCommand::Create(v) => {
            let spec = v.spec()?;
            let r = client
                .create_schema(&spec)
                .await
                .with_context(|| format!("registering schema {}", v.name))?;
            if r.existing {
                out(&format!(
                    "schema {} already has this text as version {}\n",
                    v.name, r.version
                ))
            } else {
                out(&format!(
                    "registered schema {} version {}\n",
                    v.name, r.version
                ))
            }
        }
        SchemaCommand::Check(v) => {
            let spec = v.spec()?;
            let r = client
                .check_schema(&spec)
                .await
                .with_context(|| format!("checking schema {}", v.name))?;
            if let Some(existing) = r.existing_version {
                return out(&format!(
                    "compatible: this text is version {existing} of {}\n",
                    v.name
                ));
            }
            if r.compatible {
                return out(&match r.latest_version {
                    Some(l) => format!("compatible with {} version {l}\n", v.name),
                    None => format!("compatible: {} does not exist yet\n", v.name),
                });
            }
            let mut text = format!("NOT compatible with {}:\n", v.name);
            for violation in &r.violations {
                text.push_str(&format!("  {violation}\n"));
            }
            out(&text)?;
            anyhow::bail!("{} violation(s)", r.violations.len())
        }
        SchemaCommand::List { tenant, json } => {
            let schemas = client
                .list_schemas(&tenant)
                .await
                .context("listing schemas")?;
            if json {
                return out_json(&Value::Array(schemas.iter().map(schema_json).collect()));
            }
            if schemas.is_empty() {
                return out("no schemas\n");
            }
            let mut table = Table::new(["SCHEMA", "TYPE", "COMPATIBILITY", "VERSIONS", "STATIONS"]);
            for s in &schemas {
                table.row(vec![
                    s.name.clone(),
                    s.r#type.clone(),
                    s.compatibility.clone(),
                    s.versions
                        .iter()
                        .map(|v| v.version.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    s.stations.join(","),
                ]);
            }
            out(&table.render())
        }
        SchemaCommand::Describe {
            name,
            version,
            tenant,
            json,
        } => {
            let s = client
                .get_schema(&tenant, &name)
                .await
                .with_context(|| format!("describing schema {name}"))?;
            if let Some(v) = version {
                let found = s
                    .versions
                    .iter()
                    .find(|x| x.version == v)
                    .with_context(|| format!("schema {name} has no version {v}"))?;
                return out(&format!("{}\n", found.text.trim_end()));
            }
            if json {
                return out_json(&schema_json(&s));
            }
            let mut text = format!(
                "schema {}/{}  type {}  compatibility {}\n",
                s.tenant, s.name, s.r#type, s.compatibility
            );
            let mut table = Table::new(["VERSION", "MESSAGE", "CREATED", "BYTES"]);
            for v in &s.versions {
                table.row(vec![
                    v.version.to_string(),
                    v.message.clone().unwrap_or_else(|| "-".to_owned()),
                    format_time_ms(v.created_at_ms),
                    v.text.len().to_string(),
                ]);
            }
            text.push_str(&table.render());
            text.push_str(&format!(
                "stations: {}\n",
                if s.stations.is_empty() {
                    "none".to_owned()
                } else {
                    s.stations.join(", ")
                }
            ));
            out(&text)
        }
        SchemaCommand::Delete {
            name,
            version,
            tenant,
        } => {
            client
                .delete_schema(&tenant, &name, version)
                .await
                .with_context(|| format!("deleting schema {name}"))?;
            out(&match version {
                Some(v) => format!("deleted version {v} of schema {name}\n"),
                None => format!("deleted schema {name}\n"),
            })
        }
        SchemaCommand::Compatibility { name, mode, tenant } => {
            let s = client
                .set_schema_compatibility(&tenant, &name, &mode)
                .await
                .with_context(|| format!("setting the compatibility of schema {name}"))?;
            out(&format!(
                "schema {} compatibility {}\n",
                s.name, s.compatibility
            ))
        }
        SchemaCommand::Attach {
            station,
            schema,
            on_invalid,
        } => {
            let (name, version) = schema_ref(&schema)?;
            client
                .attach_schema(&station, &name, version, &on_invalid)
                .await
                .with_context(|| format!("attaching schema {schema} to {station}"))?;
            out(&format!(
                "station {station} validates with schema {name}@{} (on invalid: {on_invalid})\n",
                version.map_or_else(|| "latest".to_owned(), |v| v.to_string())
            ))
        }
        SchemaCommand::Detach { station } => {
            client
                .detach_schema(&station)
                .await
                .with_context(|| format!("detaching the schema of {station}"))?;
            out(&format!("station {station} has no schema\n"))
        }
    }
}
