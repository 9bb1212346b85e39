//! Tenant and station names.
//!
//! A station is named `tenant/name`; a bare `name` belongs to the `default` tenant. Both parts
//! are 1–64 (tenant) or 1–128 (station) characters from `[A-Za-z0-9._-]`, starting with a letter
//! or digit. These rules keep names safe in file paths, metric labels and URLs.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::DEFAULT_TENANT;

const MAX_TENANT_LEN: usize = 64;
const MAX_STATION_LEN: usize = 128;

/// Why a name was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("{what} name is empty")]
    Empty { what: &'static str },
    #[error("{what} name '{name}' is longer than {max} characters")]
    TooLong {
        what: &'static str,
        name: String,
        max: usize,
    },
    #[error(
        "{what} name '{name}' has an invalid character {ch:?}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    InvalidChar {
        what: &'static str,
        name: String,
        ch: char,
    },
    #[error("station name '{name}' has more than one '/': use 'tenant/name'")]
    TooManyParts { name: String },
}

/// Validates one name part.
pub fn validate_part(what: &'static str, name: &str, max: usize) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.chars().count() > max {
        return Err(NameError::TooLong {
            what,
            name: name.to_string(),
            max,
        });
    }
    for (i, ch) in name.chars().enumerate() {
        let ok = ch.is_ascii_alphanumeric() || (i > 0 && matches!(ch, '.' | '_' | '-'));
        if !ok {
            return Err(NameError::InvalidChar {
                what,
                name: name.to_string(),
                ch,
            });
        }
    }
    Ok(())
}

/// Validates a station name prefix (an API key's scope): what a station name may start with.
pub fn validate_station_prefix(prefix: &str) -> Result<(), NameError> {
    validate_part("station prefix", prefix, MAX_STATION_LEN)
}

/// Validates a tenant name.
pub fn validate_tenant(name: &str) -> Result<(), NameError> {
    validate_part("tenant", name, MAX_TENANT_LEN)
}

/// A validated `tenant/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StationName {
    pub tenant: String,
    pub name: String,
}

impl StationName {
    /// Parses `tenant/name` or `name` (default tenant).
    pub fn parse(full: &str) -> Result<Self, NameError> {
        let mut parts = full.split('/');
        let (tenant, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, _) => (DEFAULT_TENANT, name),
            (Some(tenant), Some(name), None) => (tenant, name),
            _ => {
                return Err(NameError::TooManyParts {
                    name: full.to_string(),
                });
            }
        };
        validate_tenant(tenant)?;
        validate_part("station", name, MAX_STATION_LEN)?;
        Ok(Self {
            tenant: tenant.to_string(),
            name: name.to_string(),
        })
    }

    /// Returns the canonical `tenant/name` form, the key of the station in metadata.
    pub fn full(&self) -> String {
        format!("{}/{}", self.tenant, self.name)
    }
}

impl fmt::Display for StationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_name_belongs_to_default_tenant() {
        let n = StationName::parse("orders").unwrap();
        assert_eq!(n.tenant, "default");
        assert_eq!(n.full(), "default/orders");
    }

    #[test]
    fn tenant_prefix_is_kept() {
        let n = StationName::parse("acme/orders.v2").unwrap();
        assert_eq!((n.tenant.as_str(), n.name.as_str()), ("acme", "orders.v2"));
    }

    #[test]
    fn bad_names_are_rejected_with_reasons() {
        assert!(matches!(
            StationName::parse(""),
            Err(NameError::Empty { .. })
        ));
        assert!(matches!(
            StationName::parse("a/b/c"),
            Err(NameError::TooManyParts { .. })
        ));
        assert!(matches!(
            StationName::parse("-x"),
            Err(NameError::InvalidChar { ch: '-', .. })
        ));
        assert!(matches!(
            StationName::parse("a b"),
            Err(NameError::InvalidChar { ch: ' ', .. })
        ));
        assert!(matches!(
            StationName::parse("/x"),
            Err(NameError::Empty { what: "tenant" })
        ));
        let long = "x".repeat(129);
        assert!(matches!(
            StationName::parse(&long),
            Err(NameError::TooLong { .. })
        ));
    }
}
