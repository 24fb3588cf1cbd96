//! Traces and the log output: which calls are traced, how their spans leave
//! the gateway, and the `tracing` subscriber both go through.
//!
//! Whether a call is traced is decided before any span exists ([`Sampler`]):
//! an unsampled call costs a header lookup and a random draw, nothing more.
//! A sampled call's spans are `tracing` spans (target [`CALL_SPANS`]) that
//! the `tracing-opentelemetry` layer turns into OpenTelemetry spans; each
//! finished span goes to the [`ExportQueue`], a bounded queue that a thread
//! of its own empties into the OTLP/gRPC exporter. A full queue or a failed
//! export drops spans and counts them; a call never waits for either.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::Context;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::config::TracingConfig;

/// The `tracing` target of call and attempt spans: the only spans exported.
pub const CALL_SPANS: &str = "weir::calls";

static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// Spans sent to the collector in one request, at most.
const MAX_BATCH: usize = 512;

/// How long the first span of a batch waits for others to join it.
const BATCH_DELAY: Duration = Duration::from_millis(500);

/// How long a shutdown waits for the spans still queued to be sent.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// A failed export is logged at most this often (the drops are counted).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The running trace pipeline: the tracer provider and the sampler.
pub struct Telemetry {
    provider: SdkTracerProvider,
    sampler: Sampler,
    metrics: ExportMetrics,
}

impl Telemetry {
    /// Starts the export thread (it connects to the collector lazily: an
    /// unreachable one costs dropped spans, never a failed start).
    pub fn start(config: &TracingConfig) -> anyhow::Result<Telemetry> {
        let metrics = ExportMetrics::default();
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let queue = ExportQueue::start(config, resource.clone(), metrics.clone())?;
        let provider = SdkTracerProvider::builder()
            .with_span_processor(queue)
            // Sampling is decided before a span is made (`Sampler`): every
            // span that reaches the SDK is one to keep.
            .with_sampler(opentelemetry_sdk::trace::Sampler::AlwaysOn)
            .with_resource(resource)
            .build();
        Ok(Telemetry {
            provider,
            sampler: Sampler {
                ratio: Arc::new(AtomicU64::new(config.sample_ratio.to_bits())),
                follow_client: config.follow_client_sampling,
            },
            metrics,
        })
    }

    /// Registers `weir_trace_spans_exported_total` and `_dropped_total`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("weir_trace_spans");
        r.register(
            "exported",
            "spans the collector accepted",
            self.metrics.exported.clone(),
        );
        r.register(
            "dropped",
            "spans dropped, by reason: queue_full (the exporter fell behind) or export_failed (the collector refused or could not be reached)",
            self.metrics.dropped.clone(),
        );
    }

    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("weir")
    }

    /// Decides which calls are traced; shares its ratio with this pipeline.
    pub fn sampler(&self) -> Sampler {
        self.sampler.clone()
    }

    /// Sends the spans still queued (waiting up to [`SHUTDOWN_WAIT`]).
    pub fn shutdown(&self) {
        if let Err(err) = self.provider.shutdown_with_timeout(SHUTDOWN_WAIT) {
            tracing::warn!("traces: the spans still queued were not all sent: {err}");
        }
    }
}

/// Which calls are traced: a client's sampled `traceparent` is followed
/// (unless `follow_client_sampling` is off), and an unsampled one too;
/// calls without one are traced at the configured ratio.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// The ratio's `f64` bits: changed by a configuration reload.
    ratio: Arc<AtomicU64>,
    follow_client: bool,
}

impl Sampler {
    /// The parent a traced call's span continues (an empty context for a
    /// new trace), or `None`: the call is not traced.
    pub fn sample(&self, headers: &HeaderMap) -> Option<Context> {
        if let Some(flag) = headers
            .get(&TRACEPARENT)
            .and_then(|v| sampled_flag(v.as_bytes()))
        {
            let traced = if self.follow_client {
                flag
            } else {
                self.draw()
            };
            return traced.then(|| TraceContextPropagator::new().extract(&Headers(headers)));
        }
        self.draw().then(Context::new)
    }

    pub fn set_ratio(&self, ratio: f64) {
        self.ratio.store(ratio.to_bits(), Ordering::Relaxed);
    }

    fn ratio(&self) -> f64 {
        f64::from_bits(self.ratio.load(Ordering::Relaxed))
    }

    fn draw(&self) -> bool {
        let ratio = self.ratio();
        ratio >= 1.0 || (ratio > 0.0 && rand::random::<f64>() < ratio)
    }
}

/// The sampled flag of a W3C `traceparent` (`vv-<trace id>-<span id>-ff`),
/// or `None` when the value is not one.
fn sampled_flag(value: &[u8]) -> Option<bool> {
    let well_formed = value.len() >= 55
        && value[2] == b'-'
        && value[35] == b'-'
        && value[52] == b'-'
        && (value.len() == 55 || value[55] == b'-');
    if !well_formed {
        return None;
    }
    let flags = std::str::from_utf8(&value[53..55]).ok()?;
    Some(u8::from_str_radix(flags, 16).ok()? & 1 == 1)
}

/// Writes `cx`'s span as `traceparent` (and `tracestate`) into `headers`,
/// replacing what the client sent: the next hop's parent is this span.
pub fn inject(cx: &Context, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeadersMut(headers));
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        let Ok(name) = http::HeaderName::from_bytes(key.as_bytes()) else {
            return;
        };
        if value.is_empty() {
            // No `tracestate` rather than an empty one.
            self.0.remove(name);
        } else if let Ok(value) = http::HeaderValue::from_str(&value) {
            self.0.insert(name, value);
        }
    }
}

/// Installs the process's `tracing` subscriber: log lines on stderr by
/// `filter` (EnvFilter syntax), and with `telemetry`, call spans to it.
pub fn init_logs(filter: &str, telemetry: Option<&Telemetry>) -> anyhow::Result<()> {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let spans = telemetry.map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.tracer())
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_level(false)
            .with_target(false)
            .with_filter(Targets::new().with_target(CALL_SPANS, LevelFilter::INFO))
    });
    tracing_subscriber::registry()
        .with(log_output(filter)?)
        .with(spans)
        .try_init()
        .context("installing the log subscriber")
}

/// A subscriber with the log output alone, for what happens before
/// [`init_logs`] can run (reading the file that says whether to trace).
pub fn early_logs(filter: &str) -> anyhow::Result<impl tracing::Subscriber + Send + Sync> {
    use tracing_subscriber::prelude::*;
    Ok(tracing_subscriber::registry().with(log_output(filter)?))
}

/// Log lines on stderr, by `filter`; never call spans (formatting them
/// would be wasted work: they are for the exporter).
fn log_output<S>(filter: &str) -> anyhow::Result<impl tracing_subscriber::Layer<S>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::filter::EnvFilter;
    use tracing_subscriber::Layer as _;
    let filter = EnvFilter::try_new(filter)
        .context("--log")?
        .add_directive(format!("{CALL_SPANS}=off").parse().context("--log")?);
    Ok(tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Default)]
struct ExportMetrics {
    exported: Counter,
    dropped: Family<DropLabels, Counter>,
}

impl ExportMetrics {
    fn dropped(&self, reason: &'static str, n: usize) {
        self.dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(n as u64);
    }
}

/// A finished span, or `None`: send what is queued and stop.
type Message = Option<SpanData>;

/// The span processor: finished spans go over a bounded channel to the
/// export thread; when it is full they are dropped, not waited for.
#[derive(Debug)]
struct ExportQueue {
    sender: SyncSender<Message>,
    metrics: ExportMetrics,
    /// Says the export thread has stopped.
    stopped: Mutex<Option<Receiver<()>>>,
}

impl ExportQueue {
    fn start(
        config: &TracingConfig,
        resource: Resource,
        metrics: ExportMetrics,
    ) -> anyhow::Result<ExportQueue> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(config.queue.max(1));
        let (stop_signal, stopped) = std::sync::mpsc::channel();
        let exporter = Exporter {
            endpoint: config.otlp_endpoint.clone(),
            timeout: config.export_timeout,
            resource,
            metrics: metrics.clone(),
            last_warning: None,
        };
        std::thread::Builder::new()
            .name("weir-trace-export".into())
            .spawn(move || {
                exporter.run(receiver);
                let _ = stop_signal.send(());
            })
            .context("starting the trace export thread")?;
        Ok(ExportQueue {
            sender,
            metrics,
            stopped: Mutex::new(Some(stopped)),
        })
    }
}

impl SpanProcessor for ExportQueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.sender.try_send(Some(span)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.dropped("queue_full", 1),
            // The export thread has stopped (a shutdown): nothing sends it.
            Err(TrySendError::Disconnected(_)) => self.metrics.dropped("export_failed", 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        // Behind every span already queued; waits for room, within `timeout`
        // (a hung collector holds the export thread, never the shutdown).
        let until = Instant::now() + timeout;
        let mut mark = None;
        loop {
            match self.sender.try_send(mark.take().flatten()) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => break,
                Err(TrySendError::Full(back)) => {
                    if Instant::now() >= until {
                        return Err(OTelSdkError::Timeout(timeout));
                    }
                    mark = Some(back);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        let stopped = self.stopped.lock().expect("export queue").take();
        match stopped.map(|s| s.recv_timeout(left)) {
            None | Some(Ok(())) | Some(Err(RecvTimeoutError::Disconnected)) => Ok(()),
            Some(Err(RecvTimeoutError::Timeout)) => Err(OTelSdkError::Timeout(timeout)),
        }
    }
}

/// The export thread's side: batches spans and sends them to the collector.
struct Exporter {
    endpoint: String,
    timeout: Duration,
    resource: Resource,
    metrics: ExportMetrics,
    last_warning: Option<Instant>,
}

impl Exporter {
    fn run(mut self, receiver: Receiver<Message>) {
        // Built when the first span comes: by then the log subscriber is
        // installed (spans come through it), so a failure here is heard.
        let first = match receiver.recv() {
            Ok(Some(span)) => span,
            Ok(None) | Err(_) => return,
        };
        // The OTLP exporter is a tonic client: it needs a runtime, and this
        // thread's own keeps its connection off the data threads.
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(err) => return self.give_up(receiver, &format!("no runtime: {err}")),
        };
        let built = runtime.block_on(async {
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(self.endpoint.clone())
                .with_timeout(self.timeout)
                .build()
        });
        let mut exporter = match built {
            Ok(exporter) => exporter,
            Err(err) => return self.give_up(receiver, &err.to_string()),
        };
        exporter.set_resource(&self.resource);
        let mut batch = Vec::with_capacity(MAX_BATCH);
        batch.push(first);
        let mut stop = false;
        while !stop {
            if batch.is_empty() {
                match receiver.recv() {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) | Err(_) => stop = true,
                }
            }
            let until = Instant::now() + BATCH_DELAY;
            while !stop && !batch.is_empty() && batch.len() < MAX_BATCH {
                match receiver.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(Some(span)) => batch.push(span),
                    Ok(None) | Err(RecvTimeoutError::Disconnected) => stop = true,
                    Err(RecvTimeoutError::Timeout) => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            let spans = batch.len();
            match runtime.block_on(exporter.export(std::mem::take(&mut batch))) {
                Ok(()) => {
                    self.metrics.exported.inc_by(spans as u64);
                }
                Err(err) => {
                    self.metrics.dropped("export_failed", spans);
                    self.warn(&format!("{spans} span(s) dropped: {err}"));
                }
            }
        }
    }

    /// No exporter: every span that comes is dropped (and counted), the
    /// first one included.
    fn give_up(mut self, receiver: Receiver<Message>, why: &str) {
        self.warn(&format!(
            "cannot export to {}: {why}; spans are dropped",
            self.endpoint
        ));
        self.metrics.dropped("export_failed", 1);
        while let Ok(Some(_)) = receiver.recv() {
            self.metrics.dropped("export_failed", 1);
        }
    }

    fn warn(&mut self, message: &str) {
        let due = self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            self.last_warning = Some(Instant::now());
            tracing::warn!(endpoint = %self.endpoint, "traces: {message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampled_flag_is_read_from_a_traceparent_and_nothing_else() {
        let parent =
            |flags: &str| format!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}");
        assert_eq!(sampled_flag(parent("01").as_bytes()), Some(true));
        assert_eq!(sampled_flag(parent("00").as_bytes()), Some(false));
        assert_eq!(sampled_flag(parent("03").as_bytes()), Some(true));
        assert_eq!(sampled_flag(parent("zz").as_bytes()), None);
        assert_eq!(sampled_flag(b"00-abc"), None);
        // A later version may append fields after a dash.
        assert_eq!(
            sampled_flag(format!("{}-x", parent("01")).as_bytes()),
            Some(true)
        );
        assert_eq!(sampled_flag(format!("{}x", parent("01")).as_bytes()), None);
    }

    #[test]
    fn the_ratio_decides_calls_without_a_parent() {
        let sampler = |ratio: f64, follow_client| Sampler {
            ratio: Arc::new(AtomicU64::new(ratio.to_bits())),
            follow_client,
        };
        let none = HeaderMap::new();
        assert!(sampler(1.0, true).sample(&none).is_some());
        assert!(sampler(0.0, true).sample(&none).is_none());
        let half = sampler(0.5, true);
        let traced = (0..10_000).filter(|_| half.sample(&none).is_some()).count();
        assert!((4_000..6_000).contains(&traced), "{traced} of 10000 at 0.5");

        let mut sampled = HeaderMap::new();
        sampled.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        assert!(sampler(0.0, true).sample(&sampled).is_some());
        assert!(sampler(0.0, false).sample(&sampled).is_none());
        half.set_ratio(0.0);
        assert!(half.sample(&none).is_none());
    }
}
