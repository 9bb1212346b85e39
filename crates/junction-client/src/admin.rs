//! Tenants, stations and cluster status.

use junction_proto::v1::{
    ApiKeyInfo, AttachSchemaRequest, ClusterStatusRequest, ClusterStatusResponse,
    CreateApiKeyRequest, CreateApiKeyResponse, CreateStationRequest, CreateTenantRequest,
    DeleteStationRequest, DescribeStationRequest, GetQuotaRequest, ListApiKeysRequest,
    ListStationsRequest, ListTenantsRequest, QuotaLimits, RebalanceRequest, RemoveNodeRequest,
    RevokeApiKeyRequest, ScrubRequest, ScrubResponse, SetQuotaRequest, StationInfo, StationPolicy,
    TenantQuota, UpdateStationRequest, WhoAmIRequest, WhoAmIResponse,
};

use crate::client::Client;
use crate::error::ClientError;

/// What [`Client::create_station_with`] creates. Zero fields mean the server's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StationSpec {
    /// `tenant/name`, or `name` for the `default` tenant.
    pub name: String,
    /// 1 to 1024; 0 means 1.
    pub partitions: u32,
    /// 1, 3 or 5; 0 lets the server choose (3 on clusters of three or more nodes).
    pub replication_factor: u32,
    /// Largest accepted message; 0 means the server's configured maximum.
    pub max_message_bytes: u32,
    /// Storage, retention and compaction; `None` means file storage and no limits.
    pub policy: Option<StationPolicy>,
    /// A schema to bind the station to (a schema of its tenant).
    pub schema: Option<AttachSchemaRequest>,
}

impl StationSpec {
    /// A station with server defaults for everything but the name.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            partitions: 0,
            replication_factor: 0,
            max_message_bytes: 0,
            policy: None,
            schema: None,
        }
    }

    /// Binds the new station to a schema (`version: None`: the latest); `on_invalid`:
    /// `reject` or `dead_letter`.
    pub fn schema(mut self, schema: &str, version: Option<u32>, on_invalid: &str) -> Self {
        self.schema = Some(AttachSchemaRequest {
            station: self.name.clone(),
            schema: schema.to_owned(),
            version,
            on_invalid: on_invalid.to_owned(),
        });
        self
    }

    /// Sets the storage, retention and compaction policy.
    pub fn policy(mut self, policy: StationPolicy) -> Self {
        self.policy = Some(policy);
        self
    }

    /// Sets the number of partitions.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Sets the replication factor.
    pub fn replication_factor(mut self, replication_factor: u32) -> Self {
        self.replication_factor = replication_factor;
        self
    }

    /// Sets the largest accepted message size.
    pub fn max_message_bytes(mut self, max_message_bytes: u32) -> Self {
        self.max_message_bytes = max_message_bytes;
        self
    }
}

impl Client {
    /// Creates an API key and returns it with its token (shown only here; the cluster keeps
    /// only its SHA-256). `request.tenant` empty: the caller's own tenant.
    pub async fn create_api_key(
        &self,
        request: CreateApiKeyRequest,
    ) -> Result<CreateApiKeyResponse, ClientError> {
        // A retry after a lost reply makes a second key, whose token nobody saw: it shows in
        // `list_api_keys` and can be revoked.
        let resp = self
            .with_retry(|ch| {
                let req = request.clone();
                let mut admin = self.admin(ch);
                async move { admin.create_api_key(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// The API keys of `tenant` (empty: the caller's; for a cluster admin, every tenant's).
    pub async fn list_api_keys(&self, tenant: &str) -> Result<Vec<ApiKeyInfo>, ClientError> {
        let req = ListApiKeysRequest {
            tenant: tenant.to_owned(),
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut admin = self.admin(ch);
                async move { admin.list_api_keys(req).await }
            })
            .await?;
        Ok(resp.into_inner().keys)
    }

    /// Revokes an API key: every node refuses it from then on, and streams opened with it end.
    pub async fn revoke_api_key(&self, id: &str) -> Result<(), ClientError> {
        let req = RevokeApiKeyRequest { id: id.to_owned() };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut admin = self.admin(ch);
            async move { admin.revoke_api_key(req).await }
        })
        .await?;
        Ok(())
    }

    /// Who this client's credential says it is.
    pub async fn who_am_i(&self) -> Result<WhoAmIResponse, ClientError> {
        let resp = self
            .with_retry(|ch| {
                let mut admin = self.admin(ch);
                async move { admin.who_am_i(WhoAmIRequest {}).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// Creates a tenant. A retry after a lost reply can report ALREADY_EXISTS.
    pub async fn create_tenant(&self, name: &str) -> Result<(), ClientError> {
        let req = CreateTenantRequest {
            name: name.to_owned(),
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut admin = self.admin(ch);
            async move { admin.create_tenant(req).await }
        })
        .await?;
        Ok(())
    }

    /// Sets limits (`set`) and removes others (`clear`, by name such as `stored-bytes`) of a
    /// tenant, or of one of its stations when `station` is given. Needs a cluster admin.
    /// Returns the tenant's quotas and usage afterwards.
    pub async fn set_quota(
        &self,
        tenant: &str,
        station: Option<&str>,
        set: QuotaLimits,
        clear: Vec<String>,
    ) -> Result<TenantQuota, ClientError> {
        let req = SetQuotaRequest {
            tenant: tenant.to_owned(),
            station: station.unwrap_or_default().to_owned(),
            set: Some(set),
            clear,
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut admin = self.admin(ch);
                async move { admin.set_quota(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// A tenant's limits and usage (the caller's own tenant when `tenant` is empty).
    pub async fn get_quota(&self, tenant: &str) -> Result<TenantQuota, ClientError> {
        let req = GetQuotaRequest {
            tenant: tenant.to_owned(),
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut admin = self.admin(ch);
                async move { admin.get_quota(req).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// Every tenant's name.
    pub async fn list_tenants(&self) -> Result<Vec<String>, ClientError> {
        let resp = self
            .with_retry(|ch| {
                let mut admin = self.admin(ch);
                async move { admin.list_tenants(ListTenantsRequest {}).await }
            })
            .await?;
        Ok(resp.into_inner().tenants)
    }

    /// Creates a station (`tenant/name` or `name`) with the server's maximum message size.
    /// A retry after a lost reply can report ALREADY_EXISTS.
    pub async fn create_station(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u32,
    ) -> Result<StationInfo, ClientError> {
        self.create_station_with(
            StationSpec::new(name)
                .partitions(partitions)
                .replication_factor(replication_factor),
        )
        .await
    }

    /// Creates a station from a full [`StationSpec`].
    pub async fn create_station_with(&self, spec: StationSpec) -> Result<StationInfo, ClientError> {
        let req = CreateStationRequest {
            name: spec.name,
            partitions: spec.partitions,
            replication_factor: spec.replication_factor,
            max_message_bytes: spec.max_message_bytes,
            policy: spec.policy,
            schema: spec.schema,
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut admin = self.admin(ch);
                async move { admin.create_station(req).await }
            })
            .await?;
        resp.into_inner()
            .station
            .ok_or_else(|| ClientError::invalid_response("CreateStation reply has no station"))
    }

    /// The stations of one tenant, or of every tenant when `tenant` is `None`.
    pub async fn list_stations(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<StationInfo>, ClientError> {
        let req = ListStationsRequest {
            tenant: tenant.unwrap_or_default().to_owned(),
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut admin = self.admin(ch);
                async move { admin.list_stations(req).await }
            })
            .await?;
        Ok(resp.into_inner().stations)
    }

    /// One station with its partitions' leaders, replicas and offsets.
    pub async fn describe_station(&self, name: &str) -> Result<StationInfo, ClientError> {
        let req = DescribeStationRequest {
            name: name.to_owned(),
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut admin = self.admin(ch);
                async move { admin.describe_station(req).await }
            })
            .await?;
        resp.into_inner()
            .station
            .ok_or_else(|| ClientError::invalid_response("DescribeStation reply has no station"))
    }

    /// Replaces a station's retention, discard and compaction settings.
    pub async fn update_station(
        &self,
        name: &str,
        policy: StationPolicy,
    ) -> Result<StationInfo, ClientError> {
        let req = UpdateStationRequest {
            name: name.to_owned(),
            policy: Some(policy),
        };
        let resp = self
            .with_retry(|ch| {
                let req = req.clone();
                let mut admin = self.admin(ch);
                async move { admin.update_station(req).await }
            })
            .await?;
        resp.into_inner()
            .station
            .ok_or_else(|| ClientError::invalid_response("UpdateStation reply has no station"))
    }

    /// Deletes a station and its messages. A retry after a lost reply can report NOT_FOUND.
    pub async fn delete_station(&self, name: &str) -> Result<(), ClientError> {
        let req = DeleteStationRequest {
            name: name.to_owned(),
        };
        self.with_retry(|ch| {
            let req = req.clone();
            let mut admin = self.admin(ch);
            async move { admin.delete_station(req).await }
        })
        .await?;
        Ok(())
    }

    /// Nodes, the metadata leader, and every station with its partitions.
    pub async fn cluster_status(&self) -> Result<ClusterStatusResponse, ClientError> {
        let resp = self
            .with_retry(|ch| {
                let mut admin = self.admin(ch);
                async move { admin.cluster_status(ClusterStatusRequest {}).await }
            })
            .await?;
        Ok(resp.into_inner())
    }

    /// Runs one scrub pass on every node and returns what each found (see the `Scrub` call).
    /// One attempt against the current node, waiting as long as the pass takes: a pass reads
    /// every stored record, and is not repeated on failure.
    /// Starts removing a node from the cluster (cluster admins): its partition replicas move
    /// to other nodes, then it leaves the metadata group. Returns once that is recorded;
    /// [`Client::cluster_status`] shows the node draining until it is gone.
    pub async fn remove_node(&self, node_id: u64) -> Result<(), ClientError> {
        self.with_retry(|ch| {
            let mut admin = self.admin(ch);
            async move { admin.remove_node(RemoveNodeRequest { node_id }).await }
        })
        .await?;
        Ok(())
    }

    /// Starts a rebalance of partition replicas over the nodes (cluster admins); returns the
    /// number of moves planned.
    pub async fn rebalance(&self) -> Result<u32, ClientError> {
        let r = self
            .with_retry(|ch| {
                let mut admin = self.admin(ch);
                async move { admin.rebalance(RebalanceRequest {}).await }
            })
            .await?;
        Ok(r.into_inner().planned_moves)
    }

    pub async fn scrub(&self) -> Result<ScrubResponse, ClientError> {
        let addr = self.inner.current_address();
        let mut admin = self.admin(self.inner.channel(&addr)?);
        Ok(admin.scrub(ScrubRequest {}).await?.into_inner())
    }
}
