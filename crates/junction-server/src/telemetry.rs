//! Logging and traces across nodes.
//!
//! Every node logs to stderr. With an OTLP endpoint (`--otlp-endpoint`), it also exports
//! spans: one per client or peer gRPC call (its parent taken from the caller's W3C
//! `traceparent`), one per partition append or forward on the produce path, one per batch
//! handed to a consumer (linked to the traces of the producers of its messages), and one per
//! Raft `AppendEntries` a follower receives. Calls a node makes to another node carry the
//! current span as their `traceparent`, so one produce is one trace across the nodes it
//! touched.
//!
//! Without an endpoint none of it costs anything: the spans use their own target
//! ([`SPANS`]), which no other layer subscribes to, so `tracing` disables their call sites
//! for good, and the gRPC layer passes requests through untouched.

use std::sync::atomic::{AtomicBool, Ordering};

use junction_types::NodeId;
use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The target of every span Junction exports. Logging does not show these spans, and
/// without an exporter nothing subscribes to them.
pub const SPANS: &str = junction_raft::TRACE_TARGET;

use crate::broker_service::TRACEPARENT;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Errors setting up logging and export.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP endpoint {endpoint} is not usable: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInstalled(String),
}

/// What must outlive the node: the span exporter, flushed on [`Telemetry::shutdown`].
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued (bounded by the exporter's own timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing spans at shutdown failed");
        }
    }
}

/// Installs the process's subscriber: logs to stderr filtered by `log_filter`, and with
/// `otlp_endpoint` (an `http://` or `https://` URL of an OTLP/gRPC collector) span export.
/// Must run inside the Tokio runtime (the exporter's channel lives on it).
pub fn init(
    log_filter: tracing_subscriber::EnvFilter,
    otlp_endpoint: Option<&str>,
    node_id: Option<NodeId>,
) -> Result<Telemetry, TelemetryError> {
    let (export, provider) = match otlp_endpoint {
        None => (None, None),
        Some(endpoint) => {
            let bad = |reason: String| TelemetryError::Endpoint {
                endpoint: endpoint.to_owned(),
                reason,
            };
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(bad("it must start with http:// or https://".into()));
            }
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            let mut resource = Resource::builder_empty().with_service_name("junction");
            if let Some(id) = node_id {
                resource =
                    resource.with_attribute(KeyValue::new("service.instance.id", id.to_string()));
            }
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.build())
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("junction"))
                .with_filter(
                    tracing_subscriber::filter::Targets::new()
                        .with_target(SPANS, tracing::Level::INFO),
                );
            (Some(layer), Some(provider))
        }
    };
    // Without an exporter there is no second layer at all: an absent (`None`) layer counts as
    // one that wants every span, and the registry then made and tracked each of h2's and
    // openraft's trace-level spans on every call (11 % of a partition leader's CPU).
    match export {
        Some(layer) => logging(log_filter).with(layer).try_init(),
        None => logging(log_filter).try_init(),
    }
    .map_err(|e| TelemetryError::AlreadyInstalled(e.to_string()))?;
    if provider.is_some() {
        EXPORTING.store(true, Ordering::Relaxed);
        junction_raft::peer_auth::set_trace_context_hook(inject_current);
    }
    Ok(Telemetry { provider })
}

/// The registry with the log layer: stderr, filtered by `log_filter` (the log level and the
/// exclusion of exported spans as one filter).
fn logging(
    log_filter: tracing_subscriber::EnvFilter,
) -> impl tracing::Subscriber
+ for<'a> tracing_subscriber::registry::LookupSpan<'a>
+ Send
+ Sync
+ 'static {
    tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(log_filter.and(tracing_subscriber::filter::filter_fn(|m| {
                m.target() != SPANS
            }))),
    )
}

/// Writes the current span's context into outgoing gRPC metadata as `traceparent`.
fn inject_current(md: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(md));
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::AsciiMetadataValue::try_from(value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// One `traceparent` value as an extractor.
struct OneTraceparent<'a>(&'a str);

impl Extractor for OneTraceparent<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// A tower layer giving every gRPC call (or REST request) a server span whose parent is the
/// caller's `traceparent`; a pass-through when this process does not export spans.
/// Node-to-node calls get one only when they are part of a trace (not every heartbeat).
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcSpans {
    rest: bool,
}

impl RpcSpans {
    /// For a gRPC listener.
    pub fn grpc() -> Self {
        Self { rest: false }
    }

    /// For the REST API.
    pub fn rest() -> Self {
        Self { rest: true }
    }
}

impl<S> tower::Layer<S> for RpcSpans {
    type Service = RpcSpanService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcSpanService {
            inner,
            rest: self.rest,
        }
    }
}

/// The service of [`RpcSpans`].
#[derive(Clone, Debug)]
pub struct RpcSpanService<S> {
    inner: S,
    rest: bool,
}

/// The gRPC package of node-to-node calls.
const PEER_PACKAGE: &str = "/junction.peer.";

impl<S, B> tower::Service<http::Request<B>> for RpcSpanService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<S::Future, tracing::instrument::Instrumented<S::Future>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !exporting() {
            return futures::future::Either::Left(self.inner.call(req));
        }
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(req.headers()));
        let traced = parent.span().span_context().is_valid();
        let path = req.uri().path();
        if !traced && path.starts_with(PEER_PACKAGE) {
            // Heartbeats and Raft traffic outside any trace: no span of their own.
            return futures::future::Either::Left(self.inner.call(req));
        }
        let span = if self.rest {
            let method = req.method().as_str();
            tracing::info_span!(
                target: SPANS,
                "http",
                otel.name = %format_args!("{method} {path}"),
                otel.kind = "server",
                http.request.method = %method,
                url.path = %path,
            )
        } else {
            let (service, method) = path
                .trim_start_matches('/')
                .split_once('/')
                .unwrap_or((path, ""));
            tracing::info_span!(
                target: SPANS,
                "rpc",
                otel.name = %path,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.service = %service,
                rpc.method = %method,
            )
        };
        if traced {
            let _ = span.set_parent(parent);
        }
        let fut = span.in_scope(|| self.inner.call(req));
        futures::future::Either::Right(fut.instrument(span))
    }
}

/// Records a batch handed to a consumer: a span linked to the trace of every message in it
/// that carries a `traceparent` (the producer's), so a trace viewer leads from a produce to
/// each of its deliveries.
pub fn record_delivery<'a>(
    station: &str,
    group: &str,
    partition: u32,
    messages: usize,
    traceparents: impl Iterator<Item = &'a [u8]>,
) {
    if !exporting() {
        return;
    }
    let span = tracing::info_span!(
        target: SPANS,
        "deliver",
        otel.kind = "producer",
        station = %station,
        group = %group,
        partition,
        messages,
    );
    let propagator = TraceContextPropagator::new();
    for tp in traceparents {
        let Ok(tp) = std::str::from_utf8(tp) else {
            continue;
        };
        let cx = propagator.extract(&OneTraceparent(tp));
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            span.add_link(sc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_valid_traceparent_is_extracted() {
        let p = TraceContextPropagator::new();
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = p.extract(&OneTraceparent(good));
        let sc = cx.span().span_context().clone();
        assert!(sc.is_valid());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let cx = p.extract(&OneTraceparent(bad));
            assert!(!cx.span().span_context().is_valid(), "{bad:?} was taken");
        }
    }

    #[test]
    fn an_injected_context_reads_back() {
        let p = TraceContextPropagator::new();
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = p.extract(&OneTraceparent(tp));
        let mut md = tonic::metadata::MetadataMap::new();
        p.inject_context(&cx, &mut MetadataInjector(&mut md));
        assert_eq!(md.get(TRACEPARENT).and_then(|v| v.to_str().ok()), Some(tp));
    }

    /// A node that exports nothing makes no span its log level leaves out, nor any of its own
    /// exported spans: each would be allocated, entered and closed in the registry for nothing.
    #[test]
    fn without_export_no_span_is_made_below_the_log_level() {
        let subscriber = logging(tracing_subscriber::EnvFilter::new("info,openraft=warn"));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::trace_span!(target: "h2::proto", "poll").is_disabled());
            assert!(tracing::debug_span!(target: "openraft::core", "main").is_disabled());
            assert!(tracing::info_span!(target: SPANS, "append").is_disabled());
            assert!(!tracing::info_span!(target: "junction", "kept").is_disabled());
        });
    }

    #[test]
    fn an_endpoint_without_a_scheme_is_refused() {
        let Err(e) = init(
            tracing_subscriber::EnvFilter::new("info"),
            Some("127.0.0.1:4317"),
            Some(1),
        ) else {
            panic!("an endpoint without a scheme was accepted");
        };
        assert!(e.to_string().contains("http://"), "{e}");
    }
}
