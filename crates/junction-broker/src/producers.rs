//! Idempotent producers: handing out ids (on the controller) and the checks a node makes
//! against its metadata before a producer's batch is proposed. The sequence check itself runs
//! in the partition state machine (`junction_types::exactly_once`).

use junction_types::exactly_once::{AppendReject, ProducerBatch, ProducerIdentity};
use junction_types::names::validate_tenant;
use junction_types::{CommandResponse, MetaCommand, MetaState};

use crate::{Broker, BrokerError};

/// The longest producer name accepted, in bytes.
pub const MAX_PRODUCER_NAME_BYTES: usize = 256;

impl Broker {
    /// Hands out a producer identity for `tenant` (on the controller). A named producer gets
    /// its next epoch, which fences the instance that had the previous one.
    pub async fn init_producer(
        &self,
        tenant: &str,
        name: Option<&str>,
    ) -> Result<ProducerIdentity, BrokerError> {
        validate_tenant(tenant)?;
        if let Some(n) = name {
            validate_producer_name(n)?;
        }
        self.ensure_controller()?;
        match self
            .meta_write(MetaCommand::InitProducer {
                tenant: tenant.to_string(),
                name: name.map(str::to_string),
            })
            .await?
        {
            CommandResponse::Producer(p) => Ok(p),
            other => Err(BrokerError::Raft(format!(
                "unexpected init producer result {other:?}"
            ))),
        }
    }

    /// Checks a producer's batch for a station of `tenant` against this node's metadata.
    pub fn check_producer(&self, tenant: &str, p: &ProducerBatch) -> Result<(), BrokerError> {
        check_producer(&self.metadata(), tenant, p)
    }
}

/// Checks a producer name: 1 to 256 bytes, no control characters.
pub fn validate_producer_name(name: &str) -> Result<(), BrokerError> {
    if name.is_empty() || name.len() > MAX_PRODUCER_NAME_BYTES || name.chars().any(char::is_control)
    {
        return Err(BrokerError::InvalidArgument(format!(
            "producer name must be 1 to {MAX_PRODUCER_NAME_BYTES} bytes without control characters (got {} bytes)",
            name.len()
        )));
    }
    Ok(())
}

/// The id must have been handed out to `tenant`, and a named producer's epoch must not be
/// older than the metadata's. An id newer than this node's metadata is reported as
/// unavailable (this node lags; a retry succeeds), never as unknown.
pub fn check_producer(
    meta: &MetaState,
    tenant: &str,
    p: &ProducerBatch,
) -> Result<(), BrokerError> {
    let reg = &meta.producers;
    match reg.owner(p.id) {
        Some(owner) if owner == tenant => {}
        Some(owner) => {
            return Err(BrokerError::ProducerTenant {
                id: p.id,
                tenant: tenant.to_string(),
                owner: owner.to_string(),
            });
        }
        None if p.id != 0 && reg.is_future(p.id) => {
            return Err(BrokerError::Unavailable(format!(
                "producer id {} is not known to this node's metadata yet; retry",
                p.id
            )));
        }
        None => return Err(BrokerError::UnknownProducerId(p.id)),
    }
    if let Some(current) = reg.current_epoch(p.id)
        && p.epoch < current
    {
        return Err(BrokerError::Produce(AppendReject::Fenced {
            id: p.id,
            epoch: p.epoch,
            current,
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(id: u64, epoch: u32) -> ProducerBatch {
        ProducerBatch {
            id,
            epoch,
            base_sequence: 0,
        }
    }

    #[test]
    fn ids_are_checked_against_their_tenant_and_epoch() {
        let mut meta = MetaState::default();
        meta.tenants.insert("acme".into(), 0);
        let CommandResponse::Producer(a) = meta.apply(&MetaCommand::InitProducer {
            tenant: "acme".into(),
            name: Some("orders".into()),
        }) else {
            panic!("no producer")
        };
        assert!(check_producer(&meta, "acme", &batch(a.id, a.epoch)).is_ok());
        assert!(matches!(
            check_producer(&meta, "default", &batch(a.id, a.epoch)),
            Err(BrokerError::ProducerTenant { .. })
        ));
        meta.apply(&MetaCommand::InitProducer {
            tenant: "acme".into(),
            name: Some("orders".into()),
        });
        assert!(matches!(
            check_producer(&meta, "acme", &batch(a.id, a.epoch)),
            Err(BrokerError::Produce(AppendReject::Fenced {
                current: 1,
                ..
            }))
        ));
        assert!(matches!(
            check_producer(&meta, "acme", &batch(0, 0)),
            Err(BrokerError::UnknownProducerId(0))
        ));
        assert!(matches!(
            check_producer(&meta, "acme", &batch(1 << 40, 0)),
            Err(BrokerError::Unavailable(_))
        ));
        assert!(matches!(
            meta.apply(&MetaCommand::InitProducer {
                tenant: "nobody".into(),
                name: None,
            }),
            CommandResponse::MetaRejected(_)
        ));
    }

    #[test]
    fn producer_names_are_bounded() {
        assert!(validate_producer_name("orders-1").is_ok());
        assert!(validate_producer_name("").is_err());
        assert!(validate_producer_name(&"x".repeat(257)).is_err());
        assert!(validate_producer_name("a\nb").is_err());
    }
}
