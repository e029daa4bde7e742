//! Logs, traces and metrics.
//!
//! * **Logs**: `tracing` with an `EnvFilter` from `MICROMSG_LOG` (default `info`), as text or
//!   JSON lines on stderr.
//! * **OpenTelemetry**: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (for example
//!   `http://127.0.0.1:4317`), spans are exported over OTLP/gRPC through a batch processor,
//!   and metrics (connected clients and entities, federation counters: [`crate::metrics`])
//!   through a periodic reader. The standard `OTEL_*` variables apply (`OTEL_SERVICE_NAME`, default
//!   `micromsg-broker`; `OTEL_EXPORTER_OTLP_TIMEOUT`, …). With the variable unset nothing is
//!   exported and the OpenTelemetry layer is not even installed.
//! * **Trace context across brokers**: every federation call carries the W3C `traceparent`
//!   (and `tracestate`) of the calling span in its gRPC metadata ([`TraceContext`]); the
//!   receiving broker makes it the parent of its handler span ([`set_parent`]). A networked
//!   contact setup is therefore one trace: the caller's broker forwarding, the target's broker
//!   asking its client, and, later, the `Accepted` call back, which continues the span of the
//!   original request.
//!
//! What is never logged: secrets, nonces, keys, message bodies; client addresses only at
//! `debug` and below.

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogFormat;

/// The variable that switches OTLP export on.
pub const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// A global subscriber was already installed.
    #[error("logging already initialised: {0}")]
    AlreadyInitialised(String),
}

/// Keeps the exporters alive; [`Telemetry::shutdown`] flushes them.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

static OTEL_ON: OnceLock<bool> = OnceLock::new();

/// Whether OTLP export was switched on in this process.
pub fn otel_enabled() -> bool {
    OTEL_ON.get().copied().unwrap_or(false)
}

impl Telemetry {
    /// Flushes and stops the exporters (spans and metrics still buffered are sent).
    pub fn shutdown(self) {
        if let Some(t) = self.tracer {
            let _ = t.shutdown();
        }
        if let Some(m) = self.meter {
            let _ = m.shutdown();
        }
    }
}

/// Installs the global subscriber: the log format on stderr with the `MICROMSG_LOG` filter
/// (default `info`), and OpenTelemetry export when [`OTLP_ENDPOINT_VAR`] is set. Must run
/// inside the tokio runtime (the gRPC exporter needs it).
pub fn init(format: LogFormat) -> Result<Telemetry, TelemetryError> {
    use std::io::IsTerminal;
    let filter = std::env::var("MICROMSG_LOG").unwrap_or_else(|_| "info".to_owned());
    let telemetry = init_with_writer(
        format,
        &filter,
        std::io::stderr().is_terminal(),
        std::io::stderr,
    )?;
    std::panic::set_hook(Box::new(log_panic));
    Ok(telemetry)
}

/// An error and each cause under it, `error: cause: cause`, for a log record. A store error's
/// own text is often only "database error"; what an operator needs (SQLite's "database or disk
/// is full", a refused Postgres connection) is in its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    append_causes(&mut text, e.source());
    text
}

/// Adds `source` and each cause under it to `text`, `: cause`, leaving out a cause whose text
/// is already there: some errors print their source in their own text too (sqlx's `Io`, a
/// gRPC status's message and its transport error's cause), and once is enough.
pub fn append_causes(text: &mut String, mut source: Option<&dyn std::error::Error>) {
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
}

/// The broker's panic hook: a panic (a task's bug, a login reader's job) becomes an ERROR
/// record of the broker's log, in its format (a JSON line when logs are JSON, where the
/// default hook's plain text would break the stream) and exported over OTLP when that is on.
/// Tokio ends only the panicking task, not the process, so the record is often all an operator
/// sees. The backtrace is added when `RUST_BACKTRACE` asks for one, as the default
/// hook does.
fn log_panic(info: &std::panic::PanicHookInfo<'_>) {
    let thread = std::thread::current();
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
        .unwrap_or_default();
    let message = info.payload_as_str().unwrap_or("(a panic with no message)");
    let backtrace = std::backtrace::Backtrace::capture();
    // `None` records no field at all.
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
        .then(|| tracing::field::display(backtrace));
    tracing::error!(
        thread = thread.name().unwrap_or("unnamed"),
        %location,
        backtrace,
        "panicked: {message}"
    );
}

/// [`init`] with an explicit filter (`EnvFilter` syntax) and log destination: `make_writer` is
/// called for each record (a closure returning an `io::Write` will do), so logs can go to a
/// file or, in tests, to memory.
pub fn init_with_writer<W>(
    format: LogFormat,
    filter: &str,
    ansi: bool,
    make_writer: W,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (text, json) = match format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(make_writer),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(make_writer),
            ),
        ),
    };
    let endpoint = std::env::var(OTLP_ENDPOINT_VAR)
        .ok()
        .filter(|v| !v.is_empty());
    let mut telemetry = Telemetry::default();
    let otel_layer = match endpoint {
        None => None,
        Some(_) => {
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(
                    std::env::var("OTEL_SERVICE_NAME")
                        .unwrap_or_else(|_| "micromsg-broker".to_owned()),
                )
                .build();
            let spans = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let tracer = SdkTracerProvider::builder()
                .with_batch_exporter(spans)
                .with_resource(resource.clone())
                .build();
            let metrics = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .build()
                .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
            let meter = SdkMeterProvider::builder()
                .with_periodic_exporter(metrics)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_meter_provider(meter.clone());
            let layer =
                tracing_opentelemetry::layer().with_tracer(tracer.tracer("micromsg-broker"));
            telemetry.tracer = Some(tracer);
            telemetry.meter = Some(meter);
            let _ = OTEL_ON.set(true);
            Some(layer)
        }
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel_layer)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))?;
    Ok(telemetry)
}

/// A tonic interceptor that writes the current span's W3C trace context into the call's
/// metadata (nothing when no OpenTelemetry layer is installed).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContext;

impl tonic::service::Interceptor for TraceContext {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        inject(&tracing::Span::current(), request.metadata_mut());
        Ok(request)
    }
}

/// Writes `span`'s trace context into `metadata`.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut MetadataCarrier(metadata));
}

/// Makes the trace context found in `metadata` (if any) the parent of `span`.
pub fn set_parent(span: &tracing::Span, metadata: &MetadataMap) {
    let cx = TraceContextPropagator::new().extract(&MetadataReader(metadata));
    let _ = span.set_parent(cx);
}

struct MetadataCarrier<'a>(&'a mut MetadataMap);

impl Injector for MetadataCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataReader<'a>(&'a MetadataMap);

impl Extractor for MetadataReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use opentelemetry::trace::TraceContextExt as _;

    /// A panic is one ERROR record in the log's own format, with its message and where it
    /// happened.
    #[test]
    fn a_panic_is_logged_as_a_record() {
        let logs = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let writer = {
            let logs = std::sync::Arc::clone(&logs);
            move || SharedWriter(std::sync::Arc::clone(&logs))
        };
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(log_panic));
            let caught = std::panic::catch_unwind(|| panic!("a bug, number {}", 42));
            std::panic::set_hook(previous);
            assert!(caught.is_err());
        });
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(records.len(), 1, "{text}");
        let record = &records[0];
        assert_eq!(record["level"], "ERROR");
        assert_eq!(record["fields"]["message"], "panicked: a bug, number 42");
        let location = record["fields"]["location"].as_str().unwrap();
        assert!(location.contains("telemetry.rs:"), "{location}");
    }

    #[test]
    fn an_error_chain_names_every_cause() {
        let e = micromsg_store::StoreError::Database(sqlx_io_error("the disk is on fire"));
        assert_eq!(
            error_chain(&e),
            "database error: error communicating with database: the disk is on fire"
        );
        let plain = std::io::Error::other("alone");
        assert_eq!(error_chain(&plain), "alone");
        // A cause said earlier in the chain, not only by the error just above it, is left out.
        let refused = || std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let mut text = "Unavailable: refused".to_owned();
        append_causes(&mut text, Some(&Wrapped("transport error", refused())));
        assert_eq!(text, "Unavailable: refused: transport error");
    }

    /// An error with a text of its own and a source.
    #[derive(Debug)]
    struct Wrapped(&'static str, std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.1)
        }
    }

    fn sqlx_io_error(text: &str) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::other(text.to_owned()))
    }

    /// An `io::Write` into a shared buffer.
    struct SharedWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for SharedWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A span on one "broker" and its child on the other share the trace id, carried only by
    /// the gRPC metadata.
    #[test]
    fn trace_context_travels_in_metadata() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let caller = tracing::info_span!("caller");
            let mut metadata = MetadataMap::new();
            inject(&caller, &mut metadata);
            let header = metadata
                .get("traceparent")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            let sent = caller.context().span().span_context().trace_id();
            assert!(header.contains(&sent.to_string()), "{header}");

            let handler = tracing::info_span!("handler");
            set_parent(&handler, &metadata);
            let received = handler.context().span().span_context().trace_id();
            assert_eq!(sent, received);

            let unrelated = tracing::info_span!("unrelated");
            assert_ne!(unrelated.context().span().span_context().trace_id(), sent);
        });
    }
}
