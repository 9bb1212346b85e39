//! The `Schemas` gRPC service: the schema registry and station bindings. Changes run on the
//! controller (a call reaching another node is forwarded there, after it was authorized
//! here); reads and checks answer from this node's metadata.

use std::sync::Arc;

use junction_broker::schemas::CheckOutcome;
use junction_broker::{Broker, BrokerError};
use junction_proto::v1::schemas_server::Schemas;
use junction_proto::v1::*;
use junction_types::StationName;
use junction_types::auth::{Operation, Principal};
use junction_types::schema::{
    Compatibility, OnInvalid, SchemaBinding, SchemaRegistryError, SchemaSubject, SchemaType,
};
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, allow_station, allow_tenant};
use crate::forward::{ClientPool, hops_of, settled, stamped, with_hops};
use crate::status::to_status;

/// Serves the schema registry.
pub struct SchemasService {
    broker: Arc<Broker>,
    clients: Arc<ClientPool>,
    auth: Arc<Authenticator>,
}

fn registry_error(e: SchemaRegistryError) -> Status {
    to_status(BrokerError::Meta(e.into()))
}

/// The tenant a request names, or the caller's own.
fn tenant_of(requested: &str, who: &Principal) -> String {
    if requested.is_empty() {
        who.tenant.clone()
    } else {
        requested.to_owned()
    }
}

fn kind_of(s: &str) -> Result<SchemaType, Status> {
    s.parse().map_err(registry_error)
}

fn mode_of(s: &str) -> Result<Compatibility, Status> {
    s.parse().map_err(registry_error)
}

/// Converts an attach request into a binding, validating its fields.
pub fn binding_of(r: &AttachSchemaRequest) -> Result<SchemaBinding, Status> {
    junction_types::schema::validate_name(&r.schema).map_err(registry_error)?;
    let on_invalid = if r.on_invalid.is_empty() {
        OnInvalid::Reject
    } else {
        r.on_invalid.parse().map_err(registry_error)?
    };
    Ok(SchemaBinding {
        schema: r.schema.clone(),
        version: r.version,
        on_invalid,
    })
}

/// Checks that a binding names an existing schema (and version) of the station's tenant.
pub fn check_binding(
    broker: &Broker,
    station: &StationName,
    b: &SchemaBinding,
) -> Result<(), Status> {
    broker
        .metadata()
        .schemas
        .check_binding(&station.tenant, b)
        .map_err(registry_error)
}

/// Describes a schema; `texts` includes each version's text.
fn info(broker: &Broker, tenant: &str, name: &str, s: &SchemaSubject, texts: bool) -> SchemaInfo {
    let meta = broker.metadata();
    SchemaInfo {
        tenant: tenant.to_owned(),
        name: name.to_owned(),
        r#type: s.kind.to_string(),
        compatibility: s.compatibility.to_string(),
        versions: s
            .versions
            .values()
            .map(|v| SchemaVersionInfo {
                version: v.version,
                text: if texts { v.text.clone() } else { String::new() },
                message: v.message.clone(),
                created_at_ms: v.created_ms,
            })
            .collect(),
        stations: meta
            .schemas
            .users(tenant, name)
            .map(|(station, version)| match version {
                Some(v) => format!("{station}@{v}"),
                None => format!("{station}@latest"),
            })
            .collect(),
    }
}

impl SchemasService {
    pub fn new(broker: Arc<Broker>, clients: Arc<ClientPool>, auth: Arc<Authenticator>) -> Self {
        Self {
            broker,
            clients,
            auth,
        }
    }

    /// Returns the controller's address when this node is not the controller.
    fn controller_addr(&self, hops: u32) -> Result<Option<String>, Status> {
        crate::forward::controller_addr(&self.broker, hops)
    }

    fn subject(&self, tenant: &str, name: &str) -> Result<SchemaSubject, Status> {
        self.broker
            .metadata()
            .schemas
            .get(tenant, name)
            .cloned()
            .ok_or_else(|| {
                registry_error(SchemaRegistryError::NotFound {
                    tenant: tenant.to_owned(),
                    name: name.to_owned(),
                })
            })
    }
}

#[tonic::async_trait]
impl Schemas for SchemasService {
    async fn create_schema(
        &self,
        req: Request<CreateSchemaRequest>,
    ) -> Result<Response<CreateSchemaResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let mut r = req.into_inner();
        r.tenant = tenant_of(&r.tenant, &who);
        allow_tenant(&who, Operation::Manage, &r.tenant)?;
        let kind = kind_of(&r.r#type)?;
        let mode = r.compatibility.as_deref().map(mode_of).transpose()?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .schemas(&addr)?
                .create_schema(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        let done = self
            .broker
            .register_schema(
                &r.tenant,
                &r.name,
                kind,
                mode,
                &r.text,
                r.message.as_deref(),
            )
            .await
            .map_err(to_status)?;
        tracing::info!(tenant = %r.tenant, schema = %r.name, version = done.version, existing = done.existing, "schema registered");
        Ok(stamped(
            &self.broker,
            CreateSchemaResponse {
                version: done.version,
                existing: done.existing,
            },
        ))
    }

    async fn check_schema(
        &self,
        req: Request<CreateSchemaRequest>,
    ) -> Result<Response<CheckSchemaResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        let tenant = tenant_of(&r.tenant, &who);
        allow_tenant(&who, Operation::Describe, &tenant)?;
        let kind = kind_of(&r.r#type)?;
        let out =
            match self
                .broker
                .check_schema(&tenant, &r.name, kind, &r.text, r.message.as_deref())
            {
                Ok(CheckOutcome::Existing(v)) => CheckSchemaResponse {
                    compatible: true,
                    violations: vec![],
                    existing_version: Some(v),
                    latest_version: None,
                },
                Ok(CheckOutcome::Compatible { latest }) => CheckSchemaResponse {
                    compatible: true,
                    violations: vec![],
                    existing_version: None,
                    latest_version: latest,
                },
                Err(BrokerError::IncompatibleSchema { violations, .. }) => CheckSchemaResponse {
                    compatible: false,
                    violations,
                    existing_version: None,
                    latest_version: self
                        .broker
                        .metadata()
                        .schemas
                        .get(&tenant, &r.name)
                        .and_then(|s| s.latest().map(|v| v.version)),
                },
                Err(e) => return Err(to_status(e)),
            };
        Ok(Response::new(out))
    }

    async fn list_schemas(
        &self,
        req: Request<ListSchemasRequest>,
    ) -> Result<Response<ListSchemasResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let tenant = tenant_of(&req.into_inner().tenant, &who);
        allow_tenant(&who, Operation::Describe, &tenant)?;
        let meta = self.broker.metadata();
        let schemas = meta
            .schemas
            .of_tenant(&tenant)
            .map(|(name, s)| info(&self.broker, &tenant, name, s, false))
            .collect();
        Ok(Response::new(ListSchemasResponse { schemas }))
    }

    async fn get_schema(
        &self,
        req: Request<GetSchemaRequest>,
    ) -> Result<Response<SchemaInfo>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        let tenant = tenant_of(&r.tenant, &who);
        allow_tenant(&who, Operation::Describe, &tenant)?;
        let s = self.subject(&tenant, &r.name)?;
        Ok(Response::new(info(
            &self.broker,
            &tenant,
            &r.name,
            &s,
            true,
        )))
    }

    async fn delete_schema(
        &self,
        req: Request<DeleteSchemaRequest>,
    ) -> Result<Response<DeleteSchemaResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let mut r = req.into_inner();
        r.tenant = tenant_of(&r.tenant, &who);
        allow_tenant(&who, Operation::Manage, &r.tenant)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .schemas(&addr)?
                .delete_schema(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        self.broker
            .delete_schema(&r.tenant, &r.name, r.version)
            .await
            .map_err(to_status)?;
        Ok(stamped(&self.broker, DeleteSchemaResponse {}))
    }

    async fn set_compatibility(
        &self,
        req: Request<SetCompatibilityRequest>,
    ) -> Result<Response<SchemaInfo>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let mut r = req.into_inner();
        r.tenant = tenant_of(&r.tenant, &who);
        allow_tenant(&who, Operation::Manage, &r.tenant)?;
        let mode = mode_of(&r.compatibility)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .schemas(&addr)?
                .set_compatibility(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        self.broker
            .set_schema_compatibility(&r.tenant, &r.name, mode)
            .await
            .map_err(to_status)?;
        let s = self.subject(&r.tenant, &r.name)?;
        Ok(stamped(
            &self.broker,
            info(&self.broker, &r.tenant, &r.name, &s, false),
        ))
    }

    async fn attach_schema(
        &self,
        req: Request<AttachSchemaRequest>,
    ) -> Result<Response<AttachSchemaResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        let station = StationName::parse(&r.station).map_err(|e| to_status(e.into()))?;
        allow_station(&who, Operation::Manage, &station)?;
        let binding = binding_of(&r)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .schemas(&addr)?
                .attach_schema(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        self.broker
            .bind_schema(&station, Some(binding))
            .await
            .map_err(to_status)?;
        Ok(stamped(&self.broker, AttachSchemaResponse {}))
    }

    async fn detach_schema(
        &self,
        req: Request<DetachSchemaRequest>,
    ) -> Result<Response<DetachSchemaResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        let station = StationName::parse(&r.station).map_err(|e| to_status(e.into()))?;
        allow_station(&who, Operation::Manage, &station)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .schemas(&addr)?
                .detach_schema(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        self.broker
            .bind_schema(&station, None)
            .await
            .map_err(to_status)?;
        Ok(stamped(&self.broker, DetachSchemaResponse {}))
    }
}
