//! Producing and reading messages.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use junction_proto::v1 as pb;
use junction_proto::v1::broker_server::Broker as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::{Messages, Produce, Produced, ReadQuery};
use super::{Body, Caller, Path, Problem, ProblemDoc, Query, Rest, station_name};

/// The header that makes a REST produce safe to retry.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Messages a read returns when the caller names no maximum.
const DEFAULT_MAX: u32 = 100;
/// The most messages one read returns.
const MAX_READ: u32 = 1000;

pub(super) fn routes() -> OpenApiRouter<Arc<Rest>> {
    OpenApiRouter::new()
        .routes(routes!(produce))
        .routes(routes!(read))
}

/// Appends one or many messages; the answer comes once they are replicated and durable.
///
/// With an `Idempotency-Key` header, the messages carry it as their message id (the only
/// message: the key; message `i` of several: `<key>/<i>`), so a retry of the same request
/// within the station's dedup window (`policy.dedup_window_ms`) stores nothing again and
/// answers with the first copies' positions, marked `duplicate`. On a station without a dedup
/// window the header has no effect.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/messages", tag = "messages",
    params(("tenant" = String, Path), ("station" = String, Path),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retry store nothing again (stations with a dedup window)")),
    request_body = Produce,
    responses((status = 200, body = Produced), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn produce(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station)): Path<(String, String)>,
    headers: HeaderMap,
    Body(body): Body<Produce>,
) -> Result<Json<Produced>, Problem> {
    let key = match headers.get(IDEMPOTENCY_KEY) {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.trim().is_empty() && k.len() <= 200 => Some(k.trim().to_owned()),
            _ => {
                return Err(Problem::bad_request(
                    "Idempotency-Key must be 1 to 200 characters of visible ASCII",
                ));
            }
        },
    };
    if body.messages.is_empty() {
        return Err(Problem::bad_request(
            "`messages` is empty: give at least one",
        ));
    }
    let single = body.messages.len() == 1;
    let messages = body
        .messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let id = key.as_ref().map(|k| {
                if single {
                    k.clone()
                } else {
                    format!("{k}/{i}")
                }
            });
            m.into_proto(i, id)
        })
        .collect::<Result<Vec<_>, Problem>>()?;
    let r = s
        .broker
        .produce(caller.request(pb::ProduceRequest {
            station: station_name(&tenant, &station),
            messages,
            request_id: 0,
            producer: None,
        }))
        .await?;
    Ok(Json(r.into_inner().into()))
}

/// Committed messages of one partition, from an offset or a time.
#[utoipa::path(get, path = "/stations/{tenant}/{station}/partitions/{partition}/messages",
    tag = "messages",
    params(("tenant" = String, Path), ("station" = String, Path), ("partition" = u32, Path),
        ReadQuery),
    responses((status = 200, body = Messages), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn read(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, partition)): Path<(String, String, u32)>,
    Query(q): Query<ReadQuery>,
) -> Result<Json<Messages>, Problem> {
    let r = s
        .broker
        .read(caller.request(read_request(
            station_name(&tenant, &station),
            partition,
            &q,
        )?))
        .await?
        .into_inner();
    if let Some(from) = q.from
        && from > r.high_watermark
    {
        return Err(tonic::Status::out_of_range(format!(
            "offset {from} is past the end of partition {partition}: the next message will \
             get offset {}",
            r.high_watermark
        ))
        .into());
    }
    Ok(Json(r.into()))
}

pub(super) fn read_request(
    station: String,
    partition: u32,
    q: &ReadQuery,
) -> Result<pb::ReadRequest, Problem> {
    use pb::read_request::Start;
    let start = match (q.from, q.from_time_ms) {
        (Some(_), Some(_)) => {
            return Err(Problem::bad_request(
                "give `from` or `from_time_ms`, not both",
            ));
        }
        (Some(o), None) => Start::Offset(o),
        (None, Some(t)) => Start::TimestampMs(t),
        (None, None) => Start::Position(pb::StartPosition::Earliest as i32),
    };
    let max = q.max.unwrap_or(DEFAULT_MAX);
    if max == 0 || max > MAX_READ {
        return Err(Problem::bad_request(format!(
            "`max` must be 1 to {MAX_READ}, not {max}"
        )));
    }
    Ok(pb::ReadRequest {
        station,
        partition,
        start: Some(start),
        max_messages: max,
        max_bytes: 0,
        local_replica: false,
    })
}
