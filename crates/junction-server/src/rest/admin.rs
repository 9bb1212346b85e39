//! Cluster, identity, tenants and stations.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use junction_proto::v1 as pb;
use junction_proto::v1::admin_server::Admin;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::{
    Cluster, CreateStation, CreateTenant, Done, SetQuota, Station, Stations, StationsQuery, Tenant,
    Tenants, UpdateStation, WhoAmI,
};
use super::{Body, Caller, Path, Problem, ProblemDoc, Query, Rest, station_name};

pub(super) fn routes() -> OpenApiRouter<Arc<Rest>> {
    OpenApiRouter::new()
        .routes(routes!(cluster))
        .routes(routes!(whoami))
        .routes(routes!(list_tenants, create_tenant))
        .routes(routes!(describe_tenant))
        .routes(routes!(set_tenant_quota))
        .routes(routes!(list_stations, create_station))
        .routes(routes!(describe_station, update_station, delete_station))
}

/// Nodes, their liveness, the metadata leader and every station with its partitions.
#[utoipa::path(get, path = "/cluster", tag = "cluster",
    responses((status = 200, body = Cluster), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn cluster(State(s): State<Arc<Rest>>, caller: Caller) -> Result<Json<Cluster>, Problem> {
    let r = s
        .admin
        .cluster_status(caller.request(pb::ClusterStatusRequest {}))
        .await?;
    Ok(Json(r.into_inner().into()))
}

/// Who the presented credential says the caller is.
#[utoipa::path(get, path = "/whoami", tag = "cluster",
    responses((status = 200, body = WhoAmI), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn whoami(State(s): State<Arc<Rest>>, caller: Caller) -> Result<Json<WhoAmI>, Problem> {
    let r = s
        .admin
        .who_am_i(caller.request(pb::WhoAmIRequest {}))
        .await?;
    Ok(Json(r.into_inner().into()))
}

#[utoipa::path(get, path = "/tenants", tag = "tenants",
    responses((status = 200, body = Tenants), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_tenants(
    State(s): State<Arc<Rest>>,
    caller: Caller,
) -> Result<Json<Tenants>, Problem> {
    let r = s
        .admin
        .list_tenants(caller.request(pb::ListTenantsRequest {}))
        .await?;
    Ok(Json(Tenants {
        tenants: r.into_inner().tenants,
    }))
}

#[utoipa::path(post, path = "/tenants", tag = "tenants", request_body = CreateTenant,
    responses((status = 201, body = CreateTenant), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn create_tenant(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Body(body): Body<CreateTenant>,
) -> Result<(StatusCode, Json<CreateTenant>), Problem> {
    s.admin
        .create_tenant(caller.request(pb::CreateTenantRequest {
            name: body.name.clone(),
        }))
        .await?;
    Ok((StatusCode::CREATED, Json(body)))
}

/// Stations (of one tenant with `?tenant=`), without their partitions.
#[utoipa::path(get, path = "/stations", tag = "stations", params(StationsQuery),
    responses((status = 200, body = Stations), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_stations(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Query(q): Query<StationsQuery>,
) -> Result<Json<Stations>, Problem> {
    let r = s
        .admin
        .list_stations(caller.request(pb::ListStationsRequest {
            tenant: q.tenant.unwrap_or_default(),
        }))
        .await?;
    Ok(Json(Stations {
        stations: r
            .into_inner()
            .stations
            .into_iter()
            .map(Station::from)
            .collect(),
    }))
}

#[utoipa::path(post, path = "/stations", tag = "stations", request_body = CreateStation,
    responses((status = 201, body = Station), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn create_station(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Body(body): Body<CreateStation>,
) -> Result<(StatusCode, Json<Station>), Problem> {
    let name = match &body.tenant {
        Some(t) => station_name(t, &body.name),
        None => body.name.clone(),
    };
    let r = s
        .admin
        .create_station(caller.request(pb::CreateStationRequest {
            name,
            partitions: body.partitions.unwrap_or(0),
            replication_factor: body.replication_factor.unwrap_or(0),
            max_message_bytes: body.max_message_bytes.unwrap_or(0),
            policy: body.policy.map(Into::into),
            schema: None,
        }))
        .await?;
    let station = r
        .into_inner()
        .station
        .ok_or_else(|| Problem::from(tonic::Status::internal("no station in the answer")))?;
    Ok((StatusCode::CREATED, Json(station.into())))
}

/// A station with its partitions: leaders, replicas, offsets and sizes.
#[utoipa::path(get, path = "/stations/{tenant}/{station}", tag = "stations",
    params(("tenant" = String, Path), ("station" = String, Path)),
    responses((status = 200, body = Station), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn describe_station(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station)): Path<(String, String)>,
) -> Result<Json<Station>, Problem> {
    let r = s
        .admin
        .describe_station(caller.request(pb::DescribeStationRequest {
            name: station_name(&tenant, &station),
        }))
        .await?;
    let station = r
        .into_inner()
        .station
        .ok_or_else(|| Problem::from(tonic::Status::internal("no station in the answer")))?;
    Ok(Json(station.into()))
}

/// Replaces the station's retention, discard, compaction and deduplication settings.
#[utoipa::path(put, path = "/stations/{tenant}/{station}", tag = "stations",
    params(("tenant" = String, Path), ("station" = String, Path)), request_body = UpdateStation,
    responses((status = 200, body = Station), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn update_station(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station)): Path<(String, String)>,
    Body(body): Body<UpdateStation>,
) -> Result<Json<Station>, Problem> {
    let r = s
        .admin
        .update_station(caller.request(pb::UpdateStationRequest {
            name: station_name(&tenant, &station),
            policy: Some(body.policy.into()),
        }))
        .await?;
    let station = r
        .into_inner()
        .station
        .ok_or_else(|| Problem::from(tonic::Status::internal("no station in the answer")))?;
    Ok(Json(station.into()))
}

#[utoipa::path(delete, path = "/stations/{tenant}/{station}", tag = "stations",
    params(("tenant" = String, Path), ("station" = String, Path)),
    responses((status = 200, body = Done), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn delete_station(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station)): Path<(String, String)>,
) -> Result<Json<Done>, Problem> {
    s.admin
        .delete_station(caller.request(pb::DeleteStationRequest {
            name: station_name(&tenant, &station),
        }))
        .await?;
    Ok(Json(Done { ok: true }))
}

/// A tenant's limits and what it uses (its own principals, or cluster admins).
#[utoipa::path(get, path = "/tenants/{tenant}", tag = "tenants",
    params(("tenant" = String, Path)),
    responses((status = 200, body = Tenant), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn describe_tenant(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path(tenant): Path<String>,
) -> Result<Json<Tenant>, Problem> {
    let r = s
        .admin
        .get_quota(caller.request(pb::GetQuotaRequest { tenant }))
        .await?;
    Ok(Json(r.into_inner().into()))
}

/// Sets or clears a tenant's limits, or one of its stations' (cluster admins only). A limit
/// of 0 is refused: clear it to remove it.
#[utoipa::path(put, path = "/tenants/{tenant}/quota", tag = "tenants",
    params(("tenant" = String, Path)), request_body = SetQuota,
    responses((status = 200, body = Tenant), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn set_tenant_quota(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path(tenant): Path<String>,
    Body(body): Body<SetQuota>,
) -> Result<Json<Tenant>, Problem> {
    let r = s
        .admin
        .set_quota(caller.request(pb::SetQuotaRequest {
            tenant,
            station: body.station.unwrap_or_default(),
            set: Some(body.set.into()),
            clear: body.clear,
        }))
        .await?;
    Ok(Json(r.into_inner().into()))
}
