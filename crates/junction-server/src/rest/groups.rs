//! Consumer groups (list, create, describe, seek, clone, delete) and dead letters.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use junction_proto::v1 as pb;
use junction_proto::v1::admin_server::Admin as _;
use junction_proto::v1::broker_server::Broker as _;
use junction_proto::v1::groups_server::Groups as _;
use junction_types::groups::dead_letter_station;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::{
    AttachGroup, CloneGroup, CreateGroup, DeadLetter, DeadLetters, DeadLettersQuery, Done, Group,
    Groups, Isolation, LagBudget, ParkedDone, ParkedKey, ParkedKeyAction, ParkedKeys,
    PartitionIsolation, ReadQuery, Resend, Resent, Seek, SetBudget,
};
use super::{Body, Caller, Path, Problem, ProblemDoc, Query, Rest, station_name};

pub(super) fn routes() -> OpenApiRouter<Arc<Rest>> {
    OpenApiRouter::new()
        .routes(routes!(list_groups, create_group))
        .routes(routes!(describe_group, delete_group))
        .routes(routes!(seek_group))
        .routes(routes!(clone_group))
        .routes(routes!(list_parked))
        .routes(routes!(resume_parked))
        .routes(routes!(skip_parked))
        .routes(routes!(set_budget))
        .routes(routes!(attach_group))
        .routes(routes!(list_dead_letters))
        .routes(routes!(resend_dead_letters))
}

fn one_group(r: tonic::Response<pb::GroupInfo>) -> Json<Group> {
    Json(r.into_inner().into())
}

/// The station's consumer groups, with their members.
#[utoipa::path(get, path = "/stations/{tenant}/{station}/groups", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path)),
    responses((status = 200, body = Groups), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_groups(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station)): Path<(String, String)>,
) -> Result<Json<Groups>, Problem> {
    let r = s
        .groups
        .list_groups(caller.request(pb::ListGroupsRequest {
            station: station_name(&tenant, &station),
        }))
        .await?;
    Ok(Json(Groups {
        groups: r.into_inner().groups.into_iter().map(Group::from).collect(),
    }))
}

#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path)), request_body = CreateGroup,
    responses((status = 201, body = Group), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn create_group(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station)): Path<(String, String)>,
    Body(body): Body<CreateGroup>,
) -> Result<(StatusCode, Json<Group>), Problem> {
    let r = s
        .groups
        .create_group(caller.request(pb::CreateGroupRequest {
            station: station_name(&tenant, &station),
            group: body.group,
            settings: Some(body.settings.into_proto()?),
        }))
        .await?;
    Ok((StatusCode::CREATED, one_group(r)))
}

/// Settings, members, and per partition the position and the lag in messages and in time.
#[utoipa::path(get, path = "/stations/{tenant}/{station}/groups/{group}", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    responses((status = 200, body = Group), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn describe_group(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
) -> Result<Json<Group>, Problem> {
    let r = s
        .groups
        .describe_group(caller.request(pb::DescribeGroupRequest {
            station: station_name(&tenant, &station),
            group,
            only_partitions: vec![],
        }))
        .await?;
    Ok(one_group(r))
}

#[utoipa::path(delete, path = "/stations/{tenant}/{station}/groups/{group}", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    responses((status = 200, body = Done), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn delete_group(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
) -> Result<Json<Done>, Problem> {
    s.groups
        .delete_group(caller.request(pb::DeleteGroupRequest {
            station: station_name(&tenant, &station),
            group,
        }))
        .await?;
    Ok(Json(Done { ok: true }))
}

/// Moves the group (every partition, or one) to an offset, a time, or the earliest or latest
/// message, while it runs.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/seek", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = Seek,
    responses((status = 200, body = Group), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn seek_group(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<Seek>,
) -> Result<Json<Group>, Problem> {
    let r = s
        .groups
        .seek_group(caller.request(pb::SeekGroupRequest {
            station: station_name(&tenant, &station),
            group,
            partition: body.partition,
            target: Some(body.target()?),
        }))
        .await?;
    Ok(one_group(r))
}

/// A new group with this one's settings and positions.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/clone", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = CloneGroup,
    responses((status = 201, body = Group), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn clone_group(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<CloneGroup>,
) -> Result<(StatusCode, Json<Group>), Problem> {
    let r = s
        .groups
        .clone_group(caller.request(pb::CloneGroupRequest {
            station: station_name(&tenant, &station),
            from_group: group,
            to_group: body.to,
            partition: None,
        }))
        .await?;
    Ok((StatusCode::CREATED, one_group(r)))
}

/// What the station's groups gave up on: each dead letter with why, from where, and after
/// how many deliveries.
#[utoipa::path(get, path = "/stations/{tenant}/{station}/dead-letters", tag = "dead letters",
    params(("tenant" = String, Path), ("station" = String, Path), DeadLettersQuery),
    responses((status = 200, body = DeadLetters), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_dead_letters(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station)): Path<(String, String)>,
    Query(q): Query<DeadLettersQuery>,
) -> Result<Json<DeadLetters>, Problem> {
    let dls = dead_letter_station(&station_name(&tenant, &station));
    let req = super::messages::read_request(
        dls,
        0,
        &ReadQuery {
            from: q.from,
            from_time_ms: None,
            max: q.max,
        },
    )?;
    let r = match s.broker.read(caller.request(req)).await {
        Ok(r) => r.into_inner(),
        // No dead-letter station yet (it is made with the first group): none, if the
        // station itself exists.
        Err(e) if e.code() == tonic::Code::NotFound => {
            s.admin
                .describe_station(caller.request(pb::DescribeStationRequest {
                    name: station_name(&tenant, &station),
                }))
                .await?;
            pb::ReadResponse::default()
        }
        Err(e) => return Err(e.into()),
    };
    Ok(Json(DeadLetters {
        dead_letters: r.messages.into_iter().map(DeadLetter::from).collect(),
        next_offset: r.next_offset,
        high_watermark: r.high_watermark,
        start_offset: r.start_offset,
    }))
}

/// Appends dead letters back to the station (with their original key, headers and payload);
/// the dead-letter station keeps them.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/dead-letters/resend",
    tag = "dead letters",
    params(("tenant" = String, Path), ("station" = String, Path)), request_body = Resend,
    responses((status = 200, body = Resent), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn resend_dead_letters(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station)): Path<(String, String)>,
    Body(body): Body<Resend>,
) -> Result<Json<Resent>, Problem> {
    let r = s
        .groups
        .resend_dead_letters(caller.request(pb::ResendDeadLettersRequest {
            station: station_name(&tenant, &station),
            group: body.group.unwrap_or_default(),
            from_offset: body.from_offset.unwrap_or(0),
            to_offset: body.to_offset.unwrap_or(0),
        }))
        .await?
        .into_inner();
    Ok(Json(Resent {
        resent: r.resent,
        next_offset: r.next_offset,
    }))
}

/// The keys the group parked (`on_max_deliveries: park`), each with its head message.
#[utoipa::path(get, path = "/stations/{tenant}/{station}/groups/{group}/parked", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    responses((status = 200, body = ParkedKeys), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn list_parked(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
) -> Result<Json<ParkedKeys>, Problem> {
    let r = s
        .groups
        .list_parked(caller.request(pb::ListParkedRequest {
            station: station_name(&tenant, &station),
            group,
            partition: None,
        }))
        .await?;
    Ok(Json(ParkedKeys {
        keys: r
            .into_inner()
            .keys
            .into_iter()
            .map(ParkedKey::from)
            .collect(),
    }))
}

fn parked_request(
    tenant: &str,
    station: &str,
    group: String,
    body: &ParkedKeyAction,
) -> Result<pb::ParkedKeyRequest, Problem> {
    Ok(pb::ParkedKeyRequest {
        station: station_name(tenant, station),
        group,
        partition: body.partition,
        key: body.key_bytes()?,
        all: body.all,
    })
}

/// Delivers a parked key's head again (with fresh deliveries), or every parked key of a
/// partition (`all`). 409 `NOT_PARKED` for a key that is not parked.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/parked/resume",
    tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = ParkedKeyAction,
    responses((status = 200, body = ParkedDone), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn resume_parked(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<ParkedKeyAction>,
) -> Result<Json<ParkedDone>, Problem> {
    let req = parked_request(&tenant, &station, group, &body)?;
    let r = s.groups.resume_parked(caller.request(req)).await?;
    Ok(Json(ParkedDone {
        keys: r.into_inner().keys,
    }))
}

/// Moves a parked key's head to the dead-letter station (reason `skipped`); the key goes on.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/parked/skip",
    tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = ParkedKeyAction,
    responses((status = 200, body = ParkedDone), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn skip_parked(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<ParkedKeyAction>,
) -> Result<Json<ParkedDone>, Problem> {
    if body.all {
        return Err(Problem::bad_request("skip takes one key, not `all`"));
    }
    let req = parked_request(&tenant, &station, group, &body)?;
    let r = s.groups.skip_parked(caller.request(req)).await?;
    Ok(Json(ParkedDone {
        keys: r.into_inner().keys,
    }))
}

/// Sets or attaches in the partitions asked for (absent: every partition of the group).
async fn isolate(
    s: &Arc<Rest>,
    caller: &Caller,
    station: String,
    group: String,
    partition: Option<u32>,
    change: pb::set_isolation_request::Change,
) -> Result<Json<Isolation>, Problem> {
    let partitions: Vec<u32> = match partition {
        Some(p) => vec![p],
        None => s
            .groups
            .describe_group(caller.request(pb::DescribeGroupRequest {
                station: station.clone(),
                group: group.clone(),
                only_partitions: vec![],
            }))
            .await?
            .into_inner()
            .partitions
            .iter()
            .map(|p| p.partition)
            .collect(),
    };
    let mut out = Vec::with_capacity(partitions.len());
    for p in partitions {
        let r = s
            .groups
            .set_isolation(caller.request(pb::SetIsolationRequest {
                station: station.clone(),
                group: group.clone(),
                partition: p,
                change: Some(change),
            }))
            .await?
            .into_inner();
        out.push(PartitionIsolation {
            partition: p,
            budget: LagBudget::from_proto(r.budget),
            detached_at_ms: r.detached_at_ms,
        });
    }
    Ok(Json(Isolation { partitions: out }))
}

/// Sets a group's isolation budget: past it in a partition, the group is detached there and
/// `ack` retention no longer waits for it. The detached state is kept; an absent limit is no
/// limit.
#[utoipa::path(put, path = "/stations/{tenant}/{station}/groups/{group}/budget", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = SetBudget,
    responses((status = 200, body = Isolation), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn set_budget(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<SetBudget>,
) -> Result<Json<Isolation>, Problem> {
    let change = pb::set_isolation_request::Change::Budget(body.budget().into_proto());
    isolate(
        &s,
        &caller,
        station_name(&tenant, &station),
        group,
        body.partition,
        change,
    )
    .await
}

/// Attaches a detached group again: `ack` retention waits for it from its position once more.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/attach", tag = "groups",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = AttachGroup,
    responses((status = 200, body = Isolation), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn attach_group(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<AttachGroup>,
) -> Result<Json<Isolation>, Problem> {
    let change = pb::set_isolation_request::Change::Reattach(true);
    isolate(
        &s,
        &caller,
        station_name(&tenant, &station),
        group,
        body.partition,
        change,
    )
    .await
}
