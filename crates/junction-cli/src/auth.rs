//! `junction auth ...`: API keys and the caller's identity.

use anyhow::Context;
use junction_client::proto::{ApiKeyInfo, CreateApiKeyRequest};
use serde_json::json;

use crate::common::{ConnArgs, Table, out, out_json};

/// Manage API keys and show who you are.
#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    #[command(subcommand)]
    pub command: AuthCommand,
    #[command(flatten)]
    pub conn: ConnArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuthCommand {
    /// API keys: create, list, revoke.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Show the tenant and role of the credential in use.
    Whoami {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum KeyCommand {
    /// Create an API key; its token is printed once.
    Create {
        /// The key's tenant (default: your own).
        #[arg(long)]
        tenant: Option<String>,
        /// reader | producer | consumer | admin | cluster-admin.
        #[arg(long)]
        role: String,
        /// Limit the key to stations whose name starts with this.
        #[arg(long)]
        stations: Option<String>,
        /// The key stops working after this long (`30d`, `12h`, `90m`, `45s`).
        #[arg(long, value_parser = parse_ttl)]
        expires: Option<u64>,
        /// A note for `key list` (who or what uses the key).
        #[arg(long, default_value = "")]
        description: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List API keys (never their secrets).
    List {
        /// A tenant (default: your own; cluster admins see every tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API key: every node refuses it and ends the streams that use it.
    Revoke { id: String },
}

/// Parses `30d`, `12h`, `90m`, `45s` into milliseconds.
pub fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("'{s}' needs a unit: d, h, m or s"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("bad duration '{s}'"))?;
    let ms = match unit {
        "d" => n.checked_mul(86_400_000),
        "h" => n.checked_mul(3_600_000),
        "m" => n.checked_mul(60_000),
        "s" => n.checked_mul(1_000),
        _ => return Err(format!("bad unit in '{s}': use d, h, m or s")),
    }
    .ok_or_else(|| format!("'{s}' is too long"))?;
    if ms == 0 {
        return Err("a key's lifetime must be above zero (leave --expires out for none)".into());
    }
    Ok(ms)
}

fn key_json(k: &ApiKeyInfo) -> serde_json::Value {
    json!({
        "id": k.id,
        "tenant": k.tenant,
        "role": k.role,
        "station_prefix": k.station_prefix,
        "description": k.description,
        "created_at_ms": k.created_at_ms,
        "expires_at_ms": k.expires_at_ms,
        "revoked_at_ms": k.revoked_at_ms,
    })
}

pub(crate) async fn run(args: AuthArgs) -> anyhow::Result<()> {
    let client = args.conn.client()?;
    match args.command {
        AuthCommand::Whoami { json } => {
            let me = client.who_am_i().await.context("asking who I am")?;
            if json {
                return out_json(&json!({
                    "tenant": me.tenant,
                    "role": me.role,
                    "station_prefix": me.station_prefix,
                    "key_id": me.key_id,
                    "auth_enabled": me.auth_enabled,
                }));
            }
            let how = if !me.auth_enabled {
                "authentication is off on this cluster".to_string()
            } else if me.key_id.is_empty() {
                "the admin token".to_string()
            } else {
                format!("API key {}", me.key_id)
            };
            let scope = me
                .station_prefix
                .map(|p| format!(", stations starting with '{p}'"))
                .unwrap_or_default();
            out(&format!(
                "tenant {}, role {}{scope} ({how})\n",
                me.tenant, me.role
            ))
        }
        AuthCommand::Key { command } => match command {
            KeyCommand::Create {
                tenant,
                role,
                stations,
                expires,
                description,
                json,
            } => {
                let r = client
                    .create_api_key(CreateApiKeyRequest {
                        tenant: tenant.unwrap_or_default(),
                        role,
                        station_prefix: stations,
                        expires_in_ms: expires,
                        description,
                    })
                    .await
                    .context("creating an API key")?;
                let key = r.key.unwrap_or_default();
                if json {
                    let mut v = key_json(&key);
                    v["token"] = json!(r.token);
                    return out_json(&v);
                }
                out(&format!(
                    "created API key {} (tenant {}, role {})\ntoken (shown once; send as 'authorization: Bearer <token>' or JUNCTION_TOKEN):\n{}\n",
                    key.id, key.tenant, key.role, r.token
                ))
            }
            KeyCommand::List { tenant, json } => {
                let keys = client
                    .list_api_keys(tenant.as_deref().unwrap_or(""))
                    .await
                    .context("listing API keys")?;
                if json {
                    return out_json(&json!(keys.iter().map(key_json).collect::<Vec<_>>()));
                }
                let mut t =
                    Table::new(["ID", "TENANT", "ROLE", "STATIONS", "STATE", "DESCRIPTION"]);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                for k in &keys {
                    let state = if k.revoked_at_ms.is_some() {
                        "revoked"
                    } else if k.expires_at_ms.is_some_and(|e| now >= e) {
                        "expired"
                    } else {
                        "active"
                    };
                    t.row(vec![
                        k.id.clone(),
                        k.tenant.clone(),
                        k.role.clone(),
                        k.station_prefix.clone().unwrap_or_else(|| "*".into()),
                        state.into(),
                        k.description.clone(),
                    ]);
                }
                out(&t.render())
            }
            KeyCommand::Revoke { id } => {
                client
                    .revoke_api_key(&id)
                    .await
                    .with_context(|| format!("revoking API key {id}"))?;
                out(&format!("revoked API key {id}\n"))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_parse_with_units() {
        assert_eq!(parse_ttl("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_ttl("12h"), Ok(12 * 3_600_000));
        assert_eq!(parse_ttl("90m"), Ok(90 * 60_000));
        assert_eq!(parse_ttl("45s"), Ok(45_000));
        assert!(parse_ttl("0s").is_err());
        assert!(parse_ttl("5").is_err());
        assert!(parse_ttl("5w").is_err());
        assert!(parse_ttl("99999999999999999d").is_err());
    }
}
