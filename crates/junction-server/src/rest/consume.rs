//! Consuming over REST without sticky sessions.
//!
//! A REST consumer is a group member named `rest:<consumer>` that pulls: `fetch` joins the
//! group (idempotent; it creates the group with the given settings the first time), asks the
//! leaders of the member's partitions for messages through the gRPC `Fetch` (forwarded to
//! each leader wherever it is), and returns them with opaque receipts. A receipt names the
//! partition, offset, delivery attempt, member and epoch, so `ack`, `nack` and `in-progress`
//! work on any node: they reach the partition leader through the gRPC `Settle`, which refuses
//! a receipt of an earlier delivery (409 `STALE_RECEIPT`).
//!
//! The node that served a consumer keeps its membership alive (heartbeats) for
//! [`KEEP_ALIVE`] after the consumer's last call through it; a consumer that stops calling
//! then leaves when its session times out, or at once with `leave`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use futures::{FutureExt, TryFutureExt};
use junction_proto::v1 as pb;
use junction_proto::v1::groups_server::Groups as _;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::model::{GroupSettings, Message};
use super::{Body, Caller, Path, Problem, ProblemDoc, Rest, station_name};
use crate::status::REASON_STALE_RECEIPT;

/// How long a node keeps a REST consumer's membership alive after its last call there.
pub const KEEP_ALIVE: Duration = Duration::from_secs(300);
/// How often a node heartbeats for a consumer it first saw in a settle (a fetch uses the
/// interval the group asks for).
const SETTLE_BEAT: Duration = Duration::from_secs(2);
/// Messages a fetch returns when the caller names no maximum.
const DEFAULT_FETCH: u32 = 10;
/// How long a fetch waits for a first message when the caller does not say.
const DEFAULT_WAIT_MS: u64 = 1_000;
/// The receipt format this build writes.
const RECEIPT_VERSION: &str = "1";

pub(super) fn routes() -> OpenApiRouter<Arc<Rest>> {
    OpenApiRouter::new()
        .routes(routes!(fetch))
        .routes(routes!(ack))
        .routes(routes!(nack))
        .routes(routes!(in_progress))
        .routes(routes!(leave))
}

/// REST consumers this node keeps alive: (station, group, member) → last call.
#[derive(Default)]
pub struct KeptMembers {
    last: parking_lot::Mutex<HashMap<(String, String, String), Instant>>,
    turn: AtomicUsize,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Fetch {
    /// The consumer's name (letters, digits, `.`, `_`, `-`; default `default`). Callers with
    /// the same name share one membership and its deliveries.
    #[serde(default)]
    pub consumer: Option<String>,
    /// At most this many messages (1 to 1000, default 10).
    #[serde(default)]
    pub max: Option<u32>,
    /// How long to wait for a first message (0 to 30 000 ms, default 1 000).
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// The group's settings when this fetch creates it.
    #[serde(default)]
    pub settings: Option<GroupSettings>,
}

/// A delivered message and the receipt that acknowledges it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Fetched {
    /// Opaque; send it to `ack`, `nack` or `in-progress` on any node.
    pub receipt: String,
    /// 1 on first delivery.
    pub delivery_count: u32,
    pub message: Message,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct FetchedBatch {
    /// The group member the consumer is (`rest:<consumer>`).
    pub member_id: String,
    pub messages: Vec<Fetched>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Receipts {
    pub receipts: Vec<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NackReceipts {
    pub receipts: Vec<String>,
    /// Deliver again no sooner than this (default 0).
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Leave {
    #[serde(default)]
    pub consumer: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Settled {
    /// Receipts that took effect.
    pub accepted: usize,
}

/// What a receipt says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub partition: u32,
    pub offset: u64,
    pub attempt: u32,
    pub epoch: u64,
    pub member: String,
}

impl Receipt {
    pub fn encode(&self) -> String {
        B64URL.encode(format!(
            "{RECEIPT_VERSION}|{}|{}|{}|{}|{}",
            self.partition, self.offset, self.attempt, self.epoch, self.member
        ))
    }

    pub fn decode(text: &str) -> Result<Self, Problem> {
        let bad = |why: &str| Problem::bad_request(format!("receipt '{text}' {why}"));
        let bytes = B64URL
            .decode(text.trim())
            .map_err(|_| bad("is not one this API handed out (not base64url)"))?;
        let plain = String::from_utf8(bytes).map_err(|_| bad("is not one this API handed out"))?;
        let parts: Vec<&str> = plain.splitn(6, '|').collect();
        let [version, partition, offset, attempt, epoch, member] = parts.as_slice() else {
            return Err(bad("is not one this API handed out"));
        };
        if *version != RECEIPT_VERSION {
            return Err(bad(&format!(
                "has format version {version}; this node reads version {RECEIPT_VERSION}"
            )));
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad("is damaged"));
        Ok(Self {
            partition: u32::try_from(num(partition)?).map_err(|_| bad("is damaged"))?,
            offset: num(offset)?,
            attempt: u32::try_from(num(attempt)?).map_err(|_| bad("is damaged"))?,
            epoch: num(epoch)?,
            member: (*member).to_owned(),
        })
    }
}

fn member_of(consumer: Option<&str>) -> Result<String, Problem> {
    let c = consumer.unwrap_or("default");
    let ok = !c.is_empty()
        && c.len() <= 100
        && c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'));
    if !ok {
        return Err(Problem::bad_request(format!(
            "consumer '{c}': use 1 to 100 letters, digits, '.', '_' or '-'"
        )));
    }
    Ok(format!("rest:{c}"))
}

impl Rest {
    /// Notes a call of a REST consumer and keeps its membership alive from this node.
    fn keep_alive(
        self: &Arc<Self>,
        caller: &Caller,
        station: &str,
        group: &str,
        member: &str,
        every: Duration,
    ) {
        let key = (station.to_owned(), group.to_owned(), member.to_owned());
        let fresh = self
            .kept
            .last
            .lock()
            .insert(key.clone(), Instant::now())
            .is_none();
        if !fresh {
            return;
        }
        let rest = Arc::downgrade(self);
        let caller = caller.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(rest) = rest.upgrade() else { return };
                let idle = rest
                    .kept
                    .last
                    .lock()
                    .get(&key)
                    .is_none_or(|t| t.elapsed() >= KEEP_ALIVE);
                let beat = if idle {
                    Err(tonic::Status::cancelled("idle"))
                } else {
                    rest.groups
                        .heartbeat(caller.request(pb::HeartbeatRequest {
                            station: key.0.clone(),
                            group: key.1.clone(),
                            member_id: key.2.clone(),
                        }))
                        .await
                        .map(|_| ())
                };
                // Unavailable: the controller is moving; keep trying while the consumer is
                // active. Anything else (idle, expired, deleted): stop; the next fetch joins.
                match beat {
                    Ok(()) => {}
                    Err(e) if e.code() == tonic::Code::Unavailable => {}
                    Err(_) => {
                        rest.kept.last.lock().remove(&key);
                        return;
                    }
                }
            }
        });
    }
}

/// Takes up to `max` messages for the consumer, from any of its partitions, waiting up to
/// `wait_ms` for the first. Joins the group first (creating it with `settings` when it does
/// not exist).
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/fetch", tag = "consume",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = Fetch,
    responses((status = 200, body = FetchedBatch), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn fetch(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<Fetch>,
) -> Result<Json<FetchedBatch>, Problem> {
    let station = station_name(&tenant, &station);
    let member_id = member_of(body.consumer.as_deref())?;
    let max = body.max.unwrap_or(DEFAULT_FETCH);
    if max == 0 || max > crate::groups_service::MAX_FETCH {
        return Err(Problem::bad_request(format!(
            "`max` must be 1 to {}, not {max}",
            crate::groups_service::MAX_FETCH
        )));
    }
    let wait_ms = body.wait_ms.unwrap_or(DEFAULT_WAIT_MS);
    if wait_ms > 30_000 {
        return Err(Problem::bad_request(format!(
            "`wait_ms` must be at most 30000, not {wait_ms}"
        )));
    }
    let settings = body.settings.map(GroupSettings::into_proto).transpose()?;
    let assignment = s
        .groups
        .join_group(caller.request(pb::JoinGroupRequest {
            station: station.clone(),
            group: group.clone(),
            member_id: member_id.clone(),
            client: "rest".into(),
            settings,
        }))
        .await?
        .into_inner();
    let beat = Duration::from_millis(assignment.heartbeat_interval_ms.clamp(100, 2_000));
    s.keep_alive(&caller, &station, &group, &member_id, beat);
    if assignment.partitions.is_empty() {
        // More members than partitions: this one has none now. Wait as asked, so a caller
        // that polls does not spin.
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
    }
    let mut parts: Vec<(u32, u64)> = assignment
        .partitions
        .iter()
        .map(|p| (p.partition, p.epoch))
        .collect();
    if !parts.is_empty() {
        let turn = s.kept.turn.fetch_add(1, Ordering::Relaxed) % parts.len();
        parts.rotate_left(turn);
    }
    let call = |partition: u32, epoch: u64, max: u32, wait_ms: u64, peek: bool| {
        let s = s.clone();
        let req = caller.request(pb::FetchRequest {
            station: station.clone(),
            group: group.clone(),
            partition,
            member_id: member_id.clone(),
            epoch,
            max_messages: max,
            wait_ms,
            peek,
        });
        async move { Ok::<_, tonic::Status>(s.groups.fetch(req).await?.into_inner()) }
    };
    let ask = |partition: u32, epoch: u64, max: u32| {
        call(partition, epoch, max, 0, false).map_ok(move |r| (partition, epoch, r.deliveries))
    };
    let mut out = Vec::new();
    let mut first_error = None;
    // What is there now, partition by partition.
    for &(p, e) in &parts {
        let room = max - u32::try_from(out.len()).unwrap_or(max);
        if room == 0 {
            break;
        }
        match ask(p, e, room).await {
            Ok(got) => out.push(got),
            Err(e) => {
                tracing::debug!(partition = p, error = %e, "REST fetch of a partition failed");
                first_error.get_or_insert(e);
            }
        }
    }
    let gathered: usize = out.iter().map(|(_, _, d)| d.len()).sum();
    // Nothing: wait on every partition until one has something, then take from it. The waits
    // only peek, so cancelling the others loses nothing; a wait that took messages and was
    // cancelled would leave them out until their ack wait ends.
    if gathered == 0 && wait_ms > 0 && !parts.is_empty() {
        let waits = parts.iter().map(|&(p, e)| {
            call(p, e, max, wait_ms, true)
                .map(move |r| match r {
                    Ok(r) if r.ready > 0 => Ok((p, e)),
                    Ok(_) => Err(None),
                    Err(e) => Err(Some(e)),
                })
                .boxed()
        });
        match futures::future::select_ok(waits).await {
            Ok(((p, e), _)) => match ask(p, e, max).await {
                Ok(got) => out.push(got),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            },
            Err(Some(e)) => {
                first_error.get_or_insert(e);
            }
            Err(None) => {}
        }
    }
    let messages: Vec<Fetched> = out
        .into_iter()
        .flat_map(|(partition, epoch, deliveries)| {
            let member_id = member_id.clone();
            deliveries.into_iter().filter_map(move |d| {
                let m = d.message?;
                Some(Fetched {
                    receipt: Receipt {
                        partition,
                        offset: m.offset,
                        attempt: d.delivery_count,
                        epoch,
                        member: member_id.clone(),
                    }
                    .encode(),
                    delivery_count: d.delivery_count,
                    message: m.into(),
                })
            })
        })
        .collect();
    if messages.is_empty()
        && let Some(e) = first_error
    {
        return Err(e.into());
    }
    Ok(Json(FetchedBatch {
        member_id,
        messages,
    }))
}

async fn settle(
    s: &Arc<Rest>,
    caller: &Caller,
    station: String,
    group: String,
    receipts: &[String],
    kind: pb::SettleKind,
    delay_ms: u64,
) -> Result<Json<Settled>, Problem> {
    if receipts.is_empty() {
        return Err(Problem::bad_request(
            "`receipts` is empty: give at least one",
        ));
    }
    let mut by_member: BTreeMap<(u32, String, u64), Vec<Receipt>> = BTreeMap::new();
    for r in receipts {
        let r = Receipt::decode(r)?;
        by_member
            .entry((r.partition, r.member.clone(), r.epoch))
            .or_default()
            .push(r);
    }
    let mut accepted = 0usize;
    let mut refused: Vec<String> = Vec::new();
    let mut first_refusal = None;
    for ((partition, member, epoch), rs) in by_member {
        s.keep_alive(caller, &station, &group, &member, SETTLE_BEAT);
        let answer = s
            .groups
            .settle(caller.request(pb::SettleRequest {
                station: station.clone(),
                group: group.clone(),
                partition,
                member_id: member,
                epoch,
                kind: kind as i32,
                offsets: rs.iter().map(|r| r.offset).collect(),
                attempts: rs.iter().map(|r| r.attempt).collect(),
                delay_ms,
            }))
            .await;
        match answer {
            Ok(a) => {
                for o in a.into_inner().outcomes {
                    if o.accepted {
                        accepted += 1;
                    } else {
                        refused.push(format!("{partition}:{}", o.offset));
                        first_refusal.get_or_insert(o.refusal);
                    }
                }
            }
            Err(e) if e.code() == tonic::Code::FailedPrecondition => {
                refused.extend(rs.iter().map(|r| format!("{partition}:{}", r.offset)));
                first_refusal.get_or_insert(e.message().to_owned());
            }
            Err(e) => return Err(e.into()),
        }
    }
    if refused.is_empty() {
        return Ok(Json(Settled { accepted }));
    }
    let mut p = Problem::new(
        axum::http::StatusCode::CONFLICT,
        format!(
            "{} of {} receipts are stale and changed nothing (the message was delivered again, \
             finished, or given to another member; fetch again): {}",
            refused.len(),
            receipts.len(),
            first_refusal.unwrap_or_default()
        ),
    );
    p.kind = format!("urn:junction:error:{REASON_STALE_RECEIPT}");
    p.code = "FAILED_PRECONDITION".into();
    p.reason = Some(REASON_STALE_RECEIPT.into());
    p.metadata.insert("accepted".into(), accepted.to_string());
    p.metadata.insert("refused".into(), refused.join(","));
    Err(p)
}

/// Acknowledges fetched messages. 409 `STALE_RECEIPT` when a receipt no longer holds (the
/// others took effect; `metadata.refused` lists `partition:offset` of those that did not).
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/ack", tag = "consume",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = Receipts,
    responses((status = 200, body = Settled), (status = 409, body = ProblemDoc, content_type = "application/problem+json"),
        (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn ack(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<Receipts>,
) -> Result<Json<Settled>, Problem> {
    let station = station_name(&tenant, &station);
    settle(
        &s,
        &caller,
        station,
        group,
        &body.receipts,
        pb::SettleKind::Ack,
        0,
    )
    .await
}

/// Gives fetched messages back for redelivery (after `delay_ms`); a message out of
/// deliveries goes to the dead-letter station.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/nack", tag = "consume",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = NackReceipts,
    responses((status = 200, body = Settled), (status = 409, body = ProblemDoc, content_type = "application/problem+json"),
        (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn nack(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<NackReceipts>,
) -> Result<Json<Settled>, Problem> {
    let station = station_name(&tenant, &station);
    let delay = body.delay_ms.unwrap_or(0);
    settle(
        &s,
        &caller,
        station,
        group,
        &body.receipts,
        pb::SettleKind::Nack,
        delay,
    )
    .await
}

/// The consumer is still working on these: their ack deadlines start over.
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/in-progress",
    tag = "consume",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = Receipts,
    responses((status = 200, body = Settled), (status = 409, body = ProblemDoc, content_type = "application/problem+json"),
        (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn in_progress(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<Receipts>,
) -> Result<Json<Settled>, Problem> {
    let station = station_name(&tenant, &station);
    let kind = pb::SettleKind::InProgress;
    settle(&s, &caller, station, group, &body.receipts, kind, 0).await
}

/// The consumer leaves the group now (its unacknowledged messages go to other members).
#[utoipa::path(post, path = "/stations/{tenant}/{station}/groups/{group}/leave", tag = "consume",
    params(("tenant" = String, Path), ("station" = String, Path), ("group" = String, Path)),
    request_body = Leave,
    responses((status = 200, body = super::model::Done), (status = "default", body = ProblemDoc, content_type = "application/problem+json")))]
async fn leave(
    State(s): State<Arc<Rest>>,
    caller: Caller,
    Path((tenant, station, group)): Path<(String, String, String)>,
    Body(body): Body<Leave>,
) -> Result<Json<super::model::Done>, Problem> {
    let station = station_name(&tenant, &station);
    let member_id = member_of(body.consumer.as_deref())?;
    s.kept
        .last
        .lock()
        .remove(&(station.clone(), group.clone(), member_id.clone()));
    s.groups
        .leave_group(caller.request(pb::LeaveGroupRequest {
            station,
            group,
            member_id,
        }))
        .await?;
    Ok(Json(super::model::Done { ok: true }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip_and_refuse_damage() {
        let r = Receipt {
            partition: 3,
            offset: 12_345,
            attempt: 2,
            epoch: 9,
            member: "rest:billing|eu".into(),
        };
        assert_eq!(Receipt::decode(&r.encode()).expect("decodes"), r);
        // Frozen: the version-1 text of this receipt.
        assert_eq!(r.encode(), B64URL.encode("1|3|12345|2|9|rest:billing|eu"));
        for bad in [
            "".to_owned(),
            "not base64!".to_owned(),
            B64URL.encode("2|3|1|1|1|m"),
            B64URL.encode("1|x|1|1|1|m"),
            B64URL.encode("1|3|1|1"),
            B64URL.encode("1|99999999999|1|1|1|m"),
        ] {
            let p = Receipt::decode(&bad).expect_err("refused");
            assert_eq!(p.status, 400, "{bad}: {}", p.detail);
        }
    }

    #[test]
    fn consumer_names() {
        assert_eq!(member_of(None).expect("default"), "rest:default");
        assert_eq!(member_of(Some("a.b-c_1")).expect("ok"), "rest:a.b-c_1");
        for bad in ["", "has space", "slash/", &"x".repeat(101)] {
            assert_eq!(member_of(Some(bad)).expect_err("refused").status, 400);
        }
    }
}
