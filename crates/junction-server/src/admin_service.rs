//! The `Admin` gRPC service. Changes run on the controller (the metadata leader); a call that
//! reaches another node is forwarded there.

use std::sync::Arc;

use junction_broker::auth::KeySpec;
use junction_broker::controller::{PartitionView, Probe};
use junction_broker::{Broker, BrokerError};
use junction_proto::v1::admin_server::Admin;
use junction_proto::v1::*;
use junction_types::auth::{ApiKey, Operation, Refusal, Role};
use junction_types::schema::SchemaBinding;
use junction_types::{MetaError, StationMeta, StationName};
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, allow_cluster, allow_station, allow_tenant};
use crate::forward::{ClientPool, hops_of, settled, stamped, with_hops};
use crate::status::to_status;

/// Serves station, tenant and cluster administration.
pub struct AdminService {
    broker: Arc<Broker>,
    clients: Arc<ClientPool>,
    auth: Arc<Authenticator>,
}

impl AdminService {
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
}

fn parse(name: &str) -> Result<StationName, Status> {
    StationName::parse(name).map_err(|e| to_status(e.into()))
}

/// Converts a station, its schema binding and (optionally) the cluster's view of its
/// partitions.
pub fn station_info(
    s: &StationMeta,
    binding: Option<&SchemaBinding>,
    views: Option<&[PartitionView]>,
) -> StationInfo {
    StationInfo {
        schema: binding.map(ToString::to_string).unwrap_or_default(),
        on_invalid: binding
            .map(|b| b.on_invalid.as_str().to_owned())
            .unwrap_or_default(),
        tenant: s.tenant.clone(),
        name: s.name.clone(),
        partitions: s.partitions.len() as u32,
        replication_factor: s.replication_factor,
        max_message_bytes: s.max_message_bytes,
        created_at_ms: s.created_at_ms,
        partition_info: views
            .unwrap_or_default()
            .iter()
            .map(|v| PartitionInfo {
                partition: v.partition,
                group_id: v.group_id,
                replicas: v.replicas.clone(),
                leader: v.leader,
                term: v.term,
                next_offset: v.next_offset,
                start_offset: v.start_offset,
                messages: v.messages,
                bytes: v.bytes,
                data_lost_at_ms: (v.data_lost_at_ms != 0).then_some(v.data_lost_at_ms),
                producers: v.producers,
                dedup_ids: v.dedup_ids,
                dedup_id_bytes: v.dedup_id_bytes,
            })
            .collect(),
        policy: Some(crate::policy::to_proto(&s.policy, &s.delivery)),
    }
}

fn describe(broker: &Broker, s: &StationMeta, probe: &Probe) -> StationInfo {
    let views = broker.partition_views(s, probe);
    let meta = broker.metadata();
    station_info(s, meta.schemas.bindings.get(&s.full_name()), Some(&views))
}

/// Like [`describe`], with each partition's stored messages and bytes.
async fn describe_measured(broker: &Broker, s: &StationMeta, probe: &Probe) -> StationInfo {
    let mut views = broker.partition_views(s, probe);
    broker.measure_partitions(&mut views).await;
    let meta = broker.metadata();
    station_info(s, meta.schemas.bindings.get(&s.full_name()), Some(&views))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_tenant(
        &self,
        req: Request<CreateTenantRequest>,
    ) -> Result<Response<CreateTenantResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        allow_cluster(&who)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .admin(&addr)?
                .create_tenant(with_hops(req.into_inner(), hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        self.broker
            .create_tenant(&req.into_inner().name)
            .await
            .map_err(to_status)?;
        Ok(stamped(&self.broker, CreateTenantResponse {}))
    }

    async fn list_tenants(
        &self,
        req: Request<ListTenantsRequest>,
    ) -> Result<Response<ListTenantsResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let tenants = self
            .broker
            .metadata()
            .tenants
            .keys()
            .filter(|t| who.sees_tenant(t))
            .cloned()
            .collect();
        Ok(Response::new(ListTenantsResponse { tenants }))
    }

    async fn create_station(
        &self,
        req: Request<CreateStationRequest>,
    ) -> Result<Response<CreateStationResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        // Validate here too, so a bad request fails fast on any node.
        let name = parse(&r.name)?;
        allow_station(&who, Operation::Manage, &name)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .admin(&addr)?
                .create_station(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        let (policy, delivery) = crate::policy::from_proto(r.policy.as_ref())?;
        let binding = r
            .schema
            .as_ref()
            .map(crate::schemas_service::binding_of)
            .transpose()?;
        if let Some(b) = &binding {
            // Refuse before creating anything: the schema (and version) must exist.
            crate::schemas_service::check_binding(&self.broker, &name, b)?;
        }
        let partitions = if r.partitions == 0 { 1 } else { r.partitions };
        let rf = match r.replication_factor {
            0 if self.broker.node_addrs().len() >= 3 => 3,
            0 => 1,
            n => n,
        };
        let s = self
            .broker
            .create_station_with_policy(
                &name,
                partitions,
                rf,
                r.max_message_bytes,
                policy,
                delivery,
            )
            .await
            .map_err(to_status)?;
        if binding.is_some() {
            self.broker
                .bind_schema(&name, binding)
                .await
                .map_err(to_status)?;
        }
        let probe = self.broker.probe_nodes().await;
        Ok(stamped(
            &self.broker,
            CreateStationResponse {
                station: Some(describe(&self.broker, &s, &probe)),
            },
        ))
    }

    async fn list_stations(
        &self,
        req: Request<ListStationsRequest>,
    ) -> Result<Response<ListStationsResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let tenant = req.into_inner().tenant;
        let meta = self.broker.metadata();
        let stations = meta
            .stations
            .values()
            .filter(|s| tenant.is_empty() || s.tenant == tenant)
            .filter(|s| who.lists_station(&s.tenant, &s.name))
            .map(|s| station_info(s, meta.schemas.bindings.get(&s.full_name()), None))
            .collect();
        Ok(Response::new(ListStationsResponse { stations }))
    }

    async fn describe_station(
        &self,
        req: Request<DescribeStationRequest>,
    ) -> Result<Response<DescribeStationResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let name = parse(&req.into_inner().name)?;
        allow_station(&who, Operation::Describe, &name)?;
        let s = self.broker.station(&name).map_err(to_status)?;
        let probe = self.broker.probe_nodes().await;
        Ok(Response::new(DescribeStationResponse {
            station: Some(describe_measured(&self.broker, &s, &probe).await),
        }))
    }

    async fn update_station(
        &self,
        req: Request<UpdateStationRequest>,
    ) -> Result<Response<UpdateStationResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        let name = parse(&r.name)?;
        allow_station(&who, Operation::Manage, &name)?;
        let (policy, delivery) = crate::policy::from_proto(r.policy.as_ref())?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .admin(&addr)?
                .update_station(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        let s = self
            .broker
            .update_station(&name, policy, delivery)
            .await
            .map_err(to_status)?;
        let probe = self.broker.probe_nodes().await;
        Ok(stamped(
            &self.broker,
            UpdateStationResponse {
                station: Some(describe(&self.broker, &s, &probe)),
            },
        ))
    }

    async fn delete_station(
        &self,
        req: Request<DeleteStationRequest>,
    ) -> Result<Response<DeleteStationResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let r = req.into_inner();
        let name = parse(&r.name)?;
        allow_station(&who, Operation::Manage, &name)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .admin(&addr)?
                .delete_station(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        self.broker.delete_station(&name).await.map_err(to_status)?;
        Ok(stamped(&self.broker, DeleteStationResponse {}))
    }

    async fn cluster_status(
        &self,
        req: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        // Any principal: clients route by it. Stations are only the caller's own.
        let who = self.auth.principal(req.metadata()).await?;
        let probe = self.broker.probe_nodes().await;
        let addrs = self.broker.node_addrs();
        let meta = self.broker.metadata();
        let all: Vec<StationInfo> = meta
            .stations
            .values()
            .map(|s| describe(&self.broker, s, &probe))
            .collect();
        let nodes = addrs
            .iter()
            .map(|(id, addr)| {
                let replicas = meta.replica_counts().get(id).copied().unwrap_or(0) as u32;
                let leaders = all
                    .iter()
                    .flat_map(|s| &s.partition_info)
                    .filter(|p| p.leader == Some(*id))
                    .count() as u32;
                NodeInfo {
                    id: *id,
                    addr: addr.clone(),
                    alive: probe.get(id).is_some_and(Option::is_some),
                    partition_replicas: replicas,
                    partition_leaders: leaders,
                    draining: meta.reconfig.draining.contains(id),
                }
            })
            .collect();
        let (leader, term) = self.broker.meta_leader();
        let stations = all
            .into_iter()
            .filter(|s| who.lists_station(&s.tenant, &s.name))
            .collect();
        Ok(Response::new(ClusterStatusResponse {
            nodes,
            metadata_leader: leader,
            metadata_term: term,
            stations,
            cluster_id: self.broker.identity().get().unwrap_or_default(),
            moves_in_progress: meta.reconfig.moves.len() as u32,
            rebalancing: meta.reconfig.rebalancing,
            format_level: u32::from(meta.format_level),
        }))
    }

    async fn create_api_key(
        &self,
        req: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        let mut r = req.into_inner();
        if r.tenant.is_empty() {
            r.tenant.clone_from(&who.tenant);
        }
        let role = Role::parse(&r.role).map_err(|e| to_status(e.into()))?;
        who.may_grant(&r.tenant, role)
            .map_err(|refusal| match refusal {
                Refusal::Hidden => to_status(BrokerError::Meta(MetaError::TenantNotFound {
                    tenant: r.tenant.clone(),
                })),
                Refusal::Denied(e) => to_status(e.into()),
            })?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .admin(&addr)?
                .create_api_key(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        let (key, token) = self
            .broker
            .create_api_key(KeySpec {
                tenant: r.tenant,
                role,
                station_prefix: r.station_prefix.filter(|p| !p.is_empty()),
                expires_in_ms: r.expires_in_ms,
                description: r.description,
            })
            .await
            .map_err(to_status)?;
        tracing::info!(key = %key.id, tenant = %key.tenant, role = %key.role, "API key created");
        Ok(stamped(
            &self.broker,
            CreateApiKeyResponse {
                key: Some(key_info(&key)),
                token,
            },
        ))
    }

    async fn list_api_keys(
        &self,
        req: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let tenant = req.into_inner().tenant;
        if !tenant.is_empty() {
            allow_tenant(&who, Operation::ManageKeys, &tenant)?;
        } else {
            allow_tenant(&who, Operation::ManageKeys, &who.tenant)?;
        }
        let keys = self
            .broker
            .metadata()
            .api_keys
            .keys
            .values()
            .filter(|k| who.sees_tenant(&k.tenant))
            .filter(|k| tenant.is_empty() || k.tenant == tenant)
            .map(key_info)
            .collect();
        Ok(Response::new(ListApiKeysResponse { keys }))
    }

    async fn revoke_api_key(
        &self,
        req: Request<RevokeApiKeyRequest>,
    ) -> Result<Response<RevokeApiKeyResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        allow_tenant(&who, Operation::ManageKeys, &who.tenant)?;
        let r = req.into_inner();
        if let Some(addr) = self.controller_addr(hops)? {
            // The controller decides the tenant again from its own copy of the key.
            let meta = self.broker.metadata();
            let owner = meta.api_keys.keys.get(&r.id).map(|k| k.tenant.clone());
            if owner.is_none_or(|t| !who.sees_tenant(&t)) {
                return Err(to_status(BrokerError::Meta(MetaError::KeyNotFound {
                    id: r.id,
                })));
            }
            let reply = self
                .clients
                .admin(&addr)?
                .revoke_api_key(with_hops(r, hops + 1))
                .await;
            return settled(&self.broker, reply).await;
        }
        let scope = (who.role != Role::ClusterAdmin).then_some(who.tenant.as_str());
        self.broker
            .revoke_api_key(&r.id, scope)
            .await
            .map_err(to_status)?;
        tracing::info!(key = %r.id, "API key revoked");
        Ok(stamped(&self.broker, RevokeApiKeyResponse {}))
    }

    async fn who_am_i(
        &self,
        req: Request<WhoAmIRequest>,
    ) -> Result<Response<WhoAmIResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        Ok(Response::new(WhoAmIResponse {
            tenant: who.tenant,
            role: who.role.to_string(),
            station_prefix: who.station_prefix,
            key_id: who.key_id.unwrap_or_default(),
            auth_enabled: self.auth.enabled(),
        }))
    }

    async fn set_quota(
        &self,
        req: Request<SetQuotaRequest>,
    ) -> Result<Response<TenantQuota>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        // A tenant's own admin may not raise its limits.
        allow_cluster(&who)?;
        let change =
            quota_change(req.get_ref()).map_err(|e| to_status(BrokerError::Meta(e.into())))?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .admin(&addr)?
                .set_quota(with_hops(req.into_inner(), hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        let tenant = req.into_inner().tenant;
        self.broker
            .set_quota(&tenant, change)
            .await
            .map_err(to_status)?;
        tracing::info!(%tenant, "quota changed");
        Ok(stamped(&self.broker, self.tenant_quota(&tenant).await))
    }

    async fn get_quota(
        &self,
        req: Request<GetQuotaRequest>,
    ) -> Result<Response<TenantQuota>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        let tenant = req.into_inner().tenant;
        let tenant = if tenant.is_empty() {
            who.tenant.clone()
        } else {
            tenant
        };
        allow_tenant(&who, Operation::Describe, &tenant)?;
        if !self.broker.metadata().tenants.contains_key(&tenant) {
            return Err(to_status(BrokerError::Meta(MetaError::TenantNotFound {
                tenant,
            })));
        }
        Ok(Response::new(self.tenant_quota(&tenant).await))
    }

    async fn scrub(&self, req: Request<ScrubRequest>) -> Result<Response<ScrubResponse>, Status> {
        let who = self.auth.principal(req.metadata()).await?;
        allow_cluster(&who)?;
        let nodes = self.broker.scrub_cluster().await;
        Ok(Response::new(ScrubResponse { nodes }))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        allow_cluster(&who)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .admin(&addr)?
                .remove_node(with_hops(req.into_inner(), hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        self.broker
            .remove_node(req.into_inner().node_id)
            .await
            .map_err(to_status)?;
        Ok(stamped(&self.broker, RemoveNodeResponse {}))
    }

    async fn rebalance(
        &self,
        req: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        let hops = hops_of(&req);
        let who = self.auth.principal(req.metadata()).await?;
        allow_cluster(&who)?;
        if let Some(addr) = self.controller_addr(hops)? {
            let r = self
                .clients
                .admin(&addr)?
                .rebalance(with_hops(req.into_inner(), hops + 1))
                .await;
            return settled(&self.broker, r).await;
        }
        let planned = self.broker.rebalance().await.map_err(to_status)?;
        Ok(stamped(
            &self.broker,
            RebalanceResponse {
                planned_moves: planned as u32,
            },
        ))
    }
}

/// Converts a key for the API (never its digest).
fn key_info(k: &ApiKey) -> ApiKeyInfo {
    ApiKeyInfo {
        id: k.id.clone(),
        tenant: k.tenant.clone(),
        role: k.role.to_string(),
        station_prefix: k.station_prefix.clone(),
        description: k.description.clone(),
        created_at_ms: k.created_ms,
        expires_at_ms: k.expires_ms,
        revoked_at_ms: k.revoked_ms,
    }
}

impl AdminService {
    /// A tenant's limits, and what it uses now (stored bytes measured for this answer).
    async fn tenant_quota(&self, tenant: &str) -> TenantQuota {
        let meta = self.broker.metadata();
        let q = meta.quotas_of(tenant);
        let stations: Vec<&StationMeta> = meta.stations_of_tenant(tenant).collect();
        let groups: std::collections::BTreeMap<u64, Vec<u64>> = stations
            .iter()
            .flat_map(|s| &s.partitions)
            .map(|p| (p.group_id, p.replicas.clone()))
            .collect();
        let bytes = self.broker.measure_groups(&groups).await;
        let stored_of = |s: &StationMeta| -> u64 {
            s.partitions
                .iter()
                .filter_map(|p| bytes.get(&p.group_id))
                .sum()
        };
        let groups_used = meta.group_count_of_tenant(tenant);
        TenantQuota {
            tenant: tenant.to_string(),
            limits: Some(limits_to_proto(&q.tenant)),
            stations: q
                .stations
                .iter()
                .map(|(name, l)| StationQuota {
                    station: name.clone(),
                    limits: Some(limits_to_proto(l)),
                    stored_bytes: meta
                        .stations
                        .get(&format!("{tenant}/{name}"))
                        .map_or(0, stored_of),
                })
                .collect(),
            stations_used: stations.len() as u64,
            groups_used,
            stored_bytes: stations.iter().map(|s| stored_of(s)).sum(),
            streams_open: self.broker.open_streams(tenant),
        }
    }
}

/// The limits of a request, by field.
fn limits_from_proto(l: &QuotaLimits) -> Vec<(junction_types::quota::QuotaField, u64)> {
    use junction_types::quota::QuotaField as F;
    [
        (F::ProduceBytesPerSec, l.produce_bytes_per_sec),
        (F::ProduceMessagesPerSec, l.produce_messages_per_sec),
        (F::ConsumeBytesPerSec, l.consume_bytes_per_sec),
        (F::StoredBytes, l.stored_bytes),
        (F::Stations, l.stations),
        (F::Groups, l.groups),
        (F::Streams, l.streams),
    ]
    .into_iter()
    .filter_map(|(f, v)| v.map(|v| (f, v)))
    .collect()
}

fn limits_to_proto(l: &junction_types::quota::QuotaLimits) -> QuotaLimits {
    use junction_types::quota::QuotaField as F;
    QuotaLimits {
        produce_bytes_per_sec: l.get(F::ProduceBytesPerSec),
        produce_messages_per_sec: l.get(F::ProduceMessagesPerSec),
        consume_bytes_per_sec: l.get(F::ConsumeBytesPerSec),
        stored_bytes: l.get(F::StoredBytes),
        stations: l.get(F::Stations),
        groups: l.get(F::Groups),
        streams: l.get(F::Streams),
    }
}

/// Converts and checks a quota request.
fn quota_change(
    r: &SetQuotaRequest,
) -> Result<junction_types::quota::QuotaChange, junction_types::quota::QuotaError> {
    let clear = r
        .clear
        .iter()
        .map(|c| c.parse())
        .collect::<Result<Vec<_>, _>>()?;
    let change = junction_types::quota::QuotaChange {
        station: (!r.station.is_empty()).then(|| r.station.clone()),
        set: r.set.as_ref().map(limits_from_proto).unwrap_or_default(),
        clear,
    };
    change.validate()?;
    Ok(change)
}
