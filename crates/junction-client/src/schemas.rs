//! The schema registry: register and check versions, list and describe schemas, bind
//! stations to them.

use junction_proto::v1::schemas_client::SchemasClient;
use junction_proto::v1::{
    AttachSchemaRequest, CheckSchemaResponse, CreateSchemaRequest, CreateSchemaResponse,
    DeleteSchemaRequest, DetachSchemaRequest, GetSchemaRequest, ListSchemasRequest, SchemaInfo,
    SetCompatibilityRequest,
};
use tonic::transport::Channel;

use crate::client::{AuthedChannel, Client};
use crate::error::ClientError;

/// A schema version to register or check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaSpec {
    /// Empty: the caller's tenant.
    pub tenant: String,
    pub name: String,
    /// `protobuf`, `json` or `avro`.
    pub kind: String,
    pub text: String,
    /// Protobuf: the payloads' message type (default: the file's first message).
    pub message: Option<String>,
    /// The mode of a new schema, or a new mode for an existing one.
    pub compatibility: Option<String>,
}

impl SchemaSpec {
    pub fn new(name: impl Into<String>, kind: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            tenant: String::new(),
            name: name.into(),
            kind: kind.into(),
            text: text.into(),
            message: None,
            compatibility: None,
        }
    }

    fn request(&self) -> CreateSchemaRequest {
        CreateSchemaRequest {
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            r#type: self.kind.clone(),
            text: self.text.clone(),
            message: self.message.clone(),
            compatibility: self.compatibility.clone(),
        }
    }
}

impl Client {
    fn schemas(&self, channel: Channel) -> SchemasClient<AuthedChannel> {
        SchemasClient::new(self.authed(channel))
    }

    /// Registers a version (creating the schema when new). An incompatible version fails
    /// with FAILED_PRECONDITION listing the violations; a text registered before returns
    /// that version with `existing`.
    pub async fn create_schema(
        &self,
        spec: &SchemaSpec,
    ) -> Result<CreateSchemaResponse, ClientError> {
        let req = spec.request();
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.schemas(ch);
                async move { c.create_schema(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// Checks a version against the schema's history without registering it.
    pub async fn check_schema(
        &self,
        spec: &SchemaSpec,
    ) -> Result<CheckSchemaResponse, ClientError> {
        let req = spec.request();
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.schemas(ch);
                async move { c.check_schema(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// The schemas of a tenant (empty: the caller's), without their texts.
    pub async fn list_schemas(&self, tenant: &str) -> Result<Vec<SchemaInfo>, ClientError> {
        let req = ListSchemasRequest {
            tenant: tenant.to_owned(),
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.schemas(ch);
                async move { c.list_schemas(req).await }
            })
            .await?;
        Ok(resp.into_inner().schemas)
    }

    /// A schema with every version's text and the stations bound to it.
    pub async fn get_schema(&self, tenant: &str, name: &str) -> Result<SchemaInfo, ClientError> {
        let req = GetSchemaRequest {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.schemas(ch);
                async move { c.get_schema(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// Deletes a version, or the whole schema (`version: None`).
    pub async fn delete_schema(
        &self,
        tenant: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<(), ClientError> {
        let req = DeleteSchemaRequest {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            version,
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.schemas(ch);
            async move { c.delete_schema(req).await }
        })
        .await?;
        Ok(())
    }

    /// Changes a schema's compatibility mode.
    pub async fn set_schema_compatibility(
        &self,
        tenant: &str,
        name: &str,
        mode: &str,
    ) -> Result<SchemaInfo, ClientError> {
        let req = SetCompatibilityRequest {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
            compatibility: mode.to_owned(),
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut c = self.schemas(ch);
                async move { c.set_compatibility(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// Binds a station to a schema of its tenant (`version: None`: the latest).
    /// `on_invalid`: `reject` (default) or `dead_letter`.
    pub async fn attach_schema(
        &self,
        station: &str,
        schema: &str,
        version: Option<u32>,
        on_invalid: &str,
    ) -> Result<(), ClientError> {
        let req = AttachSchemaRequest {
            station: station.to_owned(),
            schema: schema.to_owned(),
            version,
            on_invalid: on_invalid.to_owned(),
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.schemas(ch);
            async move { c.attach_schema(req).await }
        })
        .await?;
        Ok(())
    }

    /// Removes a station's schema.
    pub async fn detach_schema(&self, station: &str) -> Result<(), ClientError> {
        let req = DetachSchemaRequest {
            station: station.to_owned(),
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut c = self.schemas(ch);
            async move { c.detach_schema(req).await }
        })
        .await?;
        Ok(())
    }
}
