//! The REST API (`/api/v1` on the HTTP port) for parties that do not speak gRPC.
//!
//! Every handler is a thin adapter over the gRPC service of the same node: it converts the
//! JSON body to the gRPC request, calls the service in process (so forwarding to leaders,
//! authorization, quotas and validation are the same code), and converts the answer back.
//! Errors are RFC 9457 problem documents (`application/problem+json`) made from the gRPC
//! status by one table ([`http_status`]), carrying the status's stable `ErrorInfo` reason.
//!
//! One middleware ([`identify`]) takes the caller's credential (`Authorization: Bearer …`)
//! from every request; the services decide what it may do, as they do for gRPC.
//!
//! The OpenAPI 3.1 document (`/api/v1/openapi.json`) is generated from the handlers and the
//! JSON types ([`model`]), route by route, so it cannot drift from what is served.

mod admin;
mod consume;
mod groups;
mod messages;
pub mod model;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use junction_broker::Broker;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::Code;
use tonic_types::StatusExt;
use utoipa::ToSchema;
use utoipa::openapi::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::admin_service::AdminService;
use crate::auth::{AUTHORIZATION, Authenticator};
use crate::broker_service::BrokerService;
use crate::forward::ClientPool;
use crate::groups_service::GroupsService;
use crate::status;

/// Where the API lives.
pub const PREFIX: &str = "/api/v1";
/// The largest request body taken (a batch of messages, as JSON).
pub const MAX_BODY_BYTES: usize = 64 << 20;

/// What the handlers call: this node's gRPC services.
pub struct Rest {
    pub(crate) admin: AdminService,
    pub(crate) broker: BrokerService,
    pub(crate) groups: GroupsService,
    /// REST consumers this node keeps alive.
    pub(crate) kept: consume::KeptMembers,
}

impl Rest {
    pub fn new(broker: Arc<Broker>, clients: Arc<ClientPool>, auth: Arc<Authenticator>) -> Self {
        Self {
            admin: AdminService::new(broker.clone(), clients.clone(), auth.clone()),
            broker: BrokerService::new(broker.clone(), clients.clone(), auth.clone()),
            groups: GroupsService::new(broker, clients, auth),
            kept: consume::KeptMembers::default(),
        }
    }
}

/// The REST routes and their OpenAPI document, before the state is given.
fn api() -> OpenApiRouter<Arc<Rest>> {
    OpenApiRouter::with_openapi(base_document())
        .merge(admin::routes())
        .merge(messages::routes())
        .merge(groups::routes())
        .merge(consume::routes())
}

fn base_document() -> OpenApi {
    use utoipa::openapi::{ComponentsBuilder, InfoBuilder, OpenApiBuilder};
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Junction REST API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Stations, messages, consumer groups and dead letters over HTTP. Errors are \
                     RFC 9457 problem documents with the gRPC API's stable reason.",
                ))
                .build(),
        )
        .components(Some(
            ComponentsBuilder::new().schema_from::<ProblemDoc>().build(),
        ))
        .build()
}

/// The OpenAPI document of every route under [`PREFIX`].
pub fn openapi() -> OpenApi {
    let mut doc = OpenApiRouter::<Arc<Rest>>::new()
        .nest(PREFIX, api())
        .into_openapi();
    doc.paths.paths.insert(
        format!("{PREFIX}/openapi.json"),
        utoipa::openapi::PathItem::new(
            utoipa::openapi::HttpMethod::Get,
            utoipa::openapi::path::OperationBuilder::new()
                .summary(Some("This document"))
                .operation_id(Some("openapi"))
                .tag("meta")
                .response(
                    "200",
                    utoipa::openapi::ResponseBuilder::new()
                        .description("The OpenAPI 3.1 document")
                        .build(),
                ),
        ),
    );
    doc
}

/// The router of `/api/v1`, with its state.
pub fn router(rest: Arc<Rest>) -> Router {
    let (api, _) = api().split_for_parts();
    let document = Arc::new(openapi());
    let api = api
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let doc = document.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        )
        .fallback(|| async { Problem::new(StatusCode::NOT_FOUND, "no such route in the REST API") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "the route exists but does not take this method",
            )
        })
        .with_state(rest);
    Router::new()
        .nest(PREFIX, api)
        .layer(axum::middleware::from_fn(identify))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(crate::telemetry::RpcSpans::rest())
}

// ---------------------------------------------------------------------------------------
// The caller

/// Who makes a call, as far as the HTTP layer knows: the credential it presented. The
/// services turn it into a principal (and a tenant) exactly as they do for gRPC calls.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    authorization: Option<HeaderValue>,
    /// The W3C trace context, stored with produced messages.
    traceparent: Option<HeaderValue>,
}

impl Caller {
    /// A gRPC request made on the caller's behalf.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut headers = HeaderMap::new();
        if let Some(v) = &self.authorization {
            headers.insert(AUTHORIZATION, v.clone());
        }
        if let Some(v) = &self.traceparent {
            headers.insert(crate::broker_service::TRACEPARENT, v.clone());
        }
        tonic::Request::from_parts(
            tonic::metadata::MetadataMap::from_headers(headers),
            tonic::Extensions::default(),
            message,
        )
    }
}

/// The one layer every REST request passes: it reads the credential. Only `Authorization`
/// and the W3C `traceparent` are carried over to the services; no other header (in
/// particular not the cluster secret nodes use among themselves) reaches them from outside.
pub async fn identify(mut req: Request, next: Next) -> Response {
    let authorization = req.headers().get(header::AUTHORIZATION).cloned();
    if let Some(v) = &authorization
        && v.to_str().is_err()
    {
        return Problem::new(
            StatusCode::UNAUTHORIZED,
            "the Authorization header is not ASCII text; send `Bearer <token>`",
        )
        .into_response();
    }
    let traceparent = req
        .headers()
        .get(crate::broker_service::TRACEPARENT)
        .cloned();
    req.extensions_mut().insert(Caller {
        authorization,
        traceparent,
    });
    next.run(req).await
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Problem> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request did not pass the identifying layer",
            )
        })
    }
}

// ---------------------------------------------------------------------------------------
// Input

/// A JSON body; a bad one is a problem document (400, 413, 415 or 422).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(e) => Err(Problem::from_json_rejection(&e)),
        }
    }
}

/// Query parameters; bad ones are a 400 problem document.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(e) => Err(Problem::from_query_rejection(&e)),
        }
    }
}

/// Path parameters; bad ones (a partition that is not a number) are a 400 problem document.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(e) => Err(Problem::from_path_rejection(&e)),
        }
    }
}

/// `tenant/name` from the two path segments.
pub(crate) fn station_name(tenant: &str, station: &str) -> String {
    format!("{tenant}/{station}")
}

// ---------------------------------------------------------------------------------------
// Errors

/// An RFC 9457 problem document, boxed (it travels in every handler's `Err`).
#[derive(Debug, Clone)]
pub struct Problem(Box<ProblemDoc>);

impl std::ops::Deref for Problem {
    type Target = ProblemDoc;

    fn deref(&self) -> &ProblemDoc {
        &self.0
    }
}

impl std::ops::DerefMut for Problem {
    fn deref_mut(&mut self) -> &mut ProblemDoc {
        &mut self.0
    }
}

/// The fields of an RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Problem)]
pub struct ProblemDoc {
    /// `urn:junction:error:<REASON>` when the error has a stable reason, else `about:blank`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The HTTP status's phrase.
    pub title: String,
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// The gRPC code the same error has on the gRPC API (`INVALID_ARGUMENT`…).
    pub code: String,
    /// The stable reason (as in the gRPC `ErrorInfo`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The reason's details (`leader_addr`, `expected_sequence`, `limit`…).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Seconds to wait before retrying (also sent as `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<u64>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self(Box::new(ProblemDoc {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            code: grpc_code_name(code_for_http(status)).into(),
            reason: None,
            metadata: BTreeMap::new(),
            retry_after_s: None,
        }))
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, detail)
    }

    fn from_json_rejection(e: &JsonRejection) -> Self {
        let detail = match e {
            JsonRejection::MissingJsonContentType(_) => {
                "send the body as JSON, with `Content-Type: application/json`".to_owned()
            }
            _ => e.body_text(),
        };
        Self::new(e.status(), detail)
    }

    fn from_query_rejection(e: &QueryRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.body_text())
    }

    fn from_path_rejection(e: &PathRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.body_text())
    }
}

impl From<tonic::Status> for Problem {
    fn from(s: tonic::Status) -> Self {
        let details = s.get_error_details();
        let info = details.error_info();
        let reason = info.map(|i| i.reason.clone());
        let status = http_status(s.code(), reason.as_deref());
        let retry_after_s = details
            .retry_info()
            .and_then(|r| r.retry_delay)
            .map(|d| d.as_secs_f64().ceil() as u64)
            .or((s.code() == Code::Unavailable).then_some(1));
        Self(Box::new(ProblemDoc {
            kind: reason.as_ref().map_or_else(
                || "about:blank".into(),
                |r| format!("urn:junction:error:{r}"),
            ),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: s.message().to_owned(),
            code: grpc_code_name(s.code()).into(),
            metadata: info
                .map(|i| {
                    i.metadata
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
            reason,
            retry_after_s,
        }))
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = match serde_json::to_vec(&*self.0) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "a problem document could not be encoded");
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the error of this request could not be encoded: {e}"),
                )
                    .into_response();
            }
        };
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// The one table from a gRPC status (its code, and the reason when one refines it) to an
/// HTTP status.
pub fn http_status(code: Code, reason: Option<&str>) -> StatusCode {
    match reason {
        Some(status::REASON_MESSAGE_TOO_LARGE) => return StatusCode::PAYLOAD_TOO_LARGE,
        Some(status::REASON_FENCED | status::REASON_STALE_RECEIPT) => {
            return StatusCode::CONFLICT;
        }
        // Waiting does not lift it: not a 429, which says "retry later".
        Some(status::REASON_QUOTA_EXCEEDED) => return StatusCode::FORBIDDEN,
        _ => {}
    }
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable | Code::Cancelled => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The gRPC code a problem made by the HTTP layer itself stands for.
fn code_for_http(s: StatusCode) -> Code {
    match s {
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::METHOD_NOT_ALLOWED => Code::Unimplemented,
        s if s.is_server_error() => Code::Internal,
        _ => Code::InvalidArgument,
    }
}

fn grpc_code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_refined_by_reason() {
        assert_eq!(
            http_status(
                Code::InvalidArgument,
                Some(status::REASON_MESSAGE_TOO_LARGE)
            ),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            http_status(Code::InvalidArgument, None),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(Code::ResourceExhausted, Some(status::REASON_THROTTLED)),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            http_status(Code::ResourceExhausted, Some(status::REASON_QUOTA_EXCEEDED)),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            http_status(Code::FailedPrecondition, Some(status::REASON_STALE_RECEIPT)),
            StatusCode::CONFLICT
        );
        assert_eq!(
            http_status(Code::Unavailable, None),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn a_status_becomes_a_problem_with_its_reason() {
        let s =
            status::to_status(junction_broker::BrokerError::MessageTooLarge { size: 10, max: 4 });
        let p = Problem::from(s);
        assert_eq!(p.status, 413);
        assert_eq!(p.reason.as_deref(), Some("MESSAGE_TOO_LARGE"));
        assert_eq!(p.kind, "urn:junction:error:MESSAGE_TOO_LARGE");
        assert_eq!(p.metadata.get("max").map(String::as_str), Some("4"));
        assert_eq!(p.code, "INVALID_ARGUMENT");
        let unavailable = Problem::from(tonic::Status::unavailable("moving"));
        assert_eq!(unavailable.status, 503);
        assert_eq!(unavailable.retry_after_s, Some(1));
    }

    #[test]
    fn the_document_is_openapi_3_1_and_lists_the_routes() {
        let doc = serde_json::to_value(openapi()).expect("serializes");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        for p in [
            "/api/v1/cluster",
            "/api/v1/stations",
            "/api/v1/stations/{tenant}/{station}/messages",
            "/api/v1/stations/{tenant}/{station}/groups/{group}/fetch",
            "/api/v1/openapi.json",
        ] {
            assert!(paths.contains_key(p), "{p} missing from {:?}", paths.keys());
        }
    }
}
