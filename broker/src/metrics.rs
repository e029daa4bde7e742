//! The broker's OpenTelemetry metrics: observable gauges and counters read from the online
//! registry and the federation counters (exported when OTLP is on, see [`crate::telemetry`]).

use std::sync::{Arc, Weak};

use crate::federation::Federation;
use crate::online::Online;
use crate::telemetry::otel_enabled;

/// Registers the broker's observable metrics (when OTLP export is on): connected clients and
/// entities, and the federation counters. Callbacks hold weak references, so a stopped
/// broker reports nothing.
pub fn register(online: &Arc<Online>, federation: Option<&Arc<Federation>>) {
    if !otel_enabled() {
        return;
    }
    let meter = opentelemetry::global::meter("micromsg-broker");
    let w = Arc::downgrade(online);
    let _ = meter
        .u64_observable_gauge("micromsg.clients.connected")
        .with_description("logged-in client connections")
        .with_callback(move |o| {
            if let Some(online) = w.upgrade() {
                o.observe(online.connection_count() as u64, &[]);
            }
        })
        .build();
    let w = Arc::downgrade(online);
    let _ = meter
        .u64_observable_gauge("micromsg.entities.online")
        .with_description("entities with a logged-in connection")
        .with_callback(move |o| {
            if let Some(online) = w.upgrade() {
                o.observe(online.entity_count() as u64, &[]);
            }
        })
        .build();
    let Some(federation) = federation else {
        return;
    };
    let w: Weak<Federation> = Arc::downgrade(federation);
    let _ = meter
        .u64_observable_counter("micromsg.federation.events")
        .with_description("federation events by kind")
        .with_callback(move |o| {
            let Some(f) = w.upgrade() else { return };
            let c = &f.counters;
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            for (kind, value) in [
                ("initiates_forwarded", load(&c.initiates_forwarded)),
                ("initiates_overflow", load(&c.initiates_overflow)),
                ("initiates_failed", load(&c.initiates_failed)),
                ("initiates_received", load(&c.initiates_received)),
                ("accepted_relayed", load(&c.accepted_relayed)),
                ("delivered", load(&c.delivered)),
                ("delivery_retries", load(&c.delivery_retries)),
                ("delivery_expired", load(&c.delivery_expired)),
                ("received", load(&c.received)),
            ] {
                o.observe(value, &[opentelemetry::KeyValue::new("kind", kind)]);
            }
        })
        .build();
}

/// Registers the relay metrics (when OTLP export is on): relays open, bytes relayed, relays
/// refused by a limit.
pub fn register_relays(relays: &Arc<crate::relay::Relays>) {
    if !otel_enabled() {
        return;
    }
    use std::sync::atomic::Ordering::Relaxed;
    let meter = opentelemetry::global::meter("micromsg-broker");
    let w = Arc::downgrade(relays);
    let _ = meter
        .u64_observable_gauge("micromsg.relays.open")
        .with_description("relays with a joined half")
        .with_callback(move |o| {
            if let Some(r) = w.upgrade() {
                o.observe(u64::from(r.open()), &[]);
            }
        })
        .build();
    let w = Arc::downgrade(relays);
    let _ = meter
        .u64_observable_counter("micromsg.relay.bytes")
        .with_description("bytes relayed between clients, both directions")
        .with_callback(move |o| {
            if let Some(r) = w.upgrade() {
                o.observe(r.stats.bytes.load(Relaxed), &[]);
            }
        })
        .build();
    let w = Arc::downgrade(relays);
    let _ = meter
        .u64_observable_counter("micromsg.relays.refused")
        .with_description("RELAY requests refused by relay.max_per_device or relay.max_total")
        .with_callback(move |o| {
            if let Some(r) = w.upgrade() {
                o.observe(r.stats.refused_by_limit.load(Relaxed), &[]);
            }
        })
        .build();
}
