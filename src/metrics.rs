//! Prometheus metrics on an HTTP endpoint (`[metrics] address`, off unless set): what the
//! daemon served to readers and fetched from registries, read latency per frontend (cold
//! reads that waited for a fetch, warm ones answered from the cache), errors, chunks in
//! flight, cache bytes, mounts, images, whether this daemon took over from another. Counters
//! and gauges are read from the daemon's own statistics at each scrape (a collector), so
//! the data path keeps one set of atomics; latencies are histograms the frontends observe.

#![forbid(unsafe_code)]

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::daemon::Daemon;

/// Read latencies of one frontend: cold reads (a fetch was needed) and warm ones.
#[derive(Debug)]
pub struct ReadTimes {
    cold: Histogram,
    warm: Histogram,
}

impl Default for ReadTimes {
    fn default() -> Self {
        // 50 us to ~30 s
        let buckets = || Histogram::new(exponential_buckets(0.000_05, 3.0, 13));
        ReadTimes {
            cold: buckets(),
            warm: buckets(),
        }
    }
}

impl ReadTimes {
    /// A read that waited for a fetch took `d`.
    pub fn cold(&self, d: Duration) {
        self.cold.observe(d.as_secs_f64());
    }

    /// A read answered from the cache took `d`.
    pub fn warm(&self, d: Duration) {
        self.warm.observe(d.as_secs_f64());
    }
}

/// The daemon's metrics, read at each scrape.
struct DaemonCollector(Weak<Daemon>);

impl fmt::Debug for DaemonCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DaemonCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for DaemonCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(d) = self.0.upgrade() else {
            return Ok(());
        };
        let (e, r) = (&d.engine.stats, &d.engine.registry().stats);
        let served = e.bytes_served.load(Relaxed);
        counter(&mut enc, "lazyblob_read_bytes", "Bytes handed to readers", served)?;
        let fetched = r.bytes.load(Relaxed);
        counter(
            &mut enc,
            "lazyblob_registry_bytes",
            "Body bytes received from registries",
            fetched,
        )?;
        let requests = r.requests.load(Relaxed);
        counter(
            &mut enc,
            "lazyblob_registry_requests",
            "HTTP requests sent to registries",
            requests,
        )?;
        let retries = r.retries.load(Relaxed);
        counter(
            &mut enc,
            "lazyblob_registry_retries",
            "Registry attempts repeated after a fault",
            retries,
        )?;
        let failures = r.failures.load(Relaxed);
        counter(
            &mut enc,
            "lazyblob_registry_failures",
            "Registry requests that failed for good (a 404 is an answer, not a failure)",
            failures,
        )?;
        let chunks = e.chunks_fetched.load(Relaxed);
        counter(
            &mut enc,
            "lazyblob_chunks_fetched",
            "Chunks fetched and verified",
            chunks,
        )?;
        let leaf_reads = e.leaf_reads.load(Relaxed);
        counter(
            &mut enc,
            "lazyblob_leaf_reads",
            "Reads served by their leaves, without the rest of their chunk",
            leaf_reads,
        )?;
        let pauses = d.engine.ahead_pauses().0;
        counter(
            &mut enc,
            "lazyblob_fetch_ahead_pauses",
            "Fetches ahead of readers paused while their units waited to be written",
            pauses,
        )?;
        let shared = e.shared_hits.load(Relaxed);
        counter(
            &mut enc,
            "lazyblob_shared_fetches",
            "Reads served by a fetch another reader started",
            shared,
        )?;
        let (denied, kind) = (d.frontend.eio_answers(), d.frontend.kind().name());
        counter(
            &mut enc,
            "lazyblob_eio_answers",
            "Reads answered with EIO (never zeros)",
            denied,
        )?;
        let inflight = d.engine.inflight_len() as i64;
        gauge(
            &mut enc,
            "lazyblob_chunks_in_flight",
            "Chunk fetches in flight",
            inflight,
        )?;
        let cache = d.cache_bytes() as i64;
        gauge(
            &mut enc,
            "lazyblob_cache_bytes",
            "Bytes the blob cache holds on disk",
            cache,
        )?;
        let mounts = d.mounts().len() as i64;
        gauge(&mut enc, "lazyblob_mounts", "Lazy mounts", mounts)?;
        let images = d.catalog.list().len() as i64;
        gauge(&mut enc, "lazyblob_images", "Registered images", images)?;
        let took_over = i64::from(d.took_over());
        gauge(
            &mut enc,
            "lazyblob_took_over",
            "1 if this daemon took over from a stopped or upgraded one",
            took_over,
        )?;
        let evicted = (d.evicted.blobs.load(Relaxed), d.evicted.bytes.load(Relaxed));
        counter(
            &mut enc,
            "lazyblob_cache_evicted_blobs",
            "Blobs the cache limit evicted",
            evicted.0,
        )?;
        counter(
            &mut enc,
            "lazyblob_cache_evicted_bytes",
            "Bytes the cache limit evicted",
            evicted.1,
        )?;
        let mut ahead = enc.encode_descriptor(
            "lazyblob_chunks_ahead",
            "Chunks fetched ahead of readers, by the read-ahead, a startup prefetch list or the background fill",
            None,
            MetricType::Counter,
        )?;
        for (by, n) in d.frontend.fetched_ahead() {
            ConstCounter::new(n).encode(ahead.encode_family(&[("frontend", kind), ("by", by)])?)?;
        }
        per_image(&mut enc, &d)?;
        per_host(&mut enc, &d)?;
        let times = d.frontend.read_times();
        let mut h = enc.encode_descriptor(
            "lazyblob_read_duration_seconds",
            "Time the daemon took to answer a read: cold (a fetch was needed) or warm",
            None,
            MetricType::Histogram,
        )?;
        times
            .cold
            .encode(h.encode_family(&[("frontend", kind), ("path", "cold")])?)?;
        times
            .warm
            .encode(h.encode_family(&[("frontend", kind), ("path", "warm")])?)?;
        Ok(())
    }
}

/// A counter family read from `T`: name, help, value.
type Family<T> = (&'static str, &'static str, fn(&T) -> u64);

/// Bytes served to readers and requested from registries per registered image (its data
/// blobs' counters; a blob two images share counts in both).
fn per_image(enc: &mut DescriptorEncoder<'_>, d: &Daemon) -> fmt::Result {
    let images: Vec<(String, crate::engine::BlobCounters)> = d
        .catalog
        .list()
        .iter()
        .map(|img| {
            let sum = img.data.iter().map(|b| d.engine.stats.of_blob(b.key())).fold(
                crate::engine::BlobCounters::default(),
                |a, b| crate::engine::BlobCounters {
                    served: a.served + b.served,
                    fetched: a.fetched + b.fetched,
                },
            );
            (img.reference.clone(), sum)
        })
        .collect();
    let families: [Family<crate::engine::BlobCounters>; 2] = [
        (
            "lazyblob_image_read_bytes",
            "Bytes of an image handed to readers",
            |c| c.served,
        ),
        (
            "lazyblob_image_fetched_bytes",
            "Bytes of an image requested from registries",
            |c| c.fetched,
        ),
    ];
    let rows: Vec<_> = images
        .iter()
        .map(|(image, c)| (vec![("image", image.as_str())], c))
        .collect();
    labelled_counters(enc, &families, &rows)
}

/// Counter families of `families`, one sample per row (its labels, what it is read from).
fn labelled_counters<T>(
    enc: &mut DescriptorEncoder<'_>,
    families: &[Family<T>],
    rows: &[(Vec<(&str, &str)>, &T)],
) -> fmt::Result {
    for (name, help, value) in families {
        let mut family = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, source) in rows {
            ConstCounter::new(value(source)).encode(family.encode_family(labels)?)?;
        }
    }
    Ok(())
}

/// Requests, retries, failures, bytes and request latency per registry host and kind of
/// request (`manifest`, `range`).
fn per_host(enc: &mut DescriptorEncoder<'_>, d: &Daemon) -> fmt::Result {
    use crate::registry::HostStats;
    let hosts = d.engine.registry().stats.hosts();
    let families: [Family<HostStats>; 4] = [
        (
            "lazyblob_registry_host_requests",
            "HTTP requests sent to a registry host",
            |h| h.requests.load(Relaxed),
        ),
        (
            "lazyblob_registry_host_retries",
            "Attempts repeated against a registry host",
            |h| h.retries.load(Relaxed),
        ),
        (
            "lazyblob_registry_host_failures",
            "Operations that failed for good on a registry host (404s not counted)",
            |h| h.failures.load(Relaxed),
        ),
        (
            "lazyblob_registry_host_bytes",
            "Body bytes received from a registry host",
            |h| h.bytes.load(Relaxed),
        ),
    ];
    let rows: Vec<_> = hosts
        .iter()
        .map(|(host, op, stats)| (vec![("host", host.as_str()), ("op", *op)], &**stats))
        .collect();
    labelled_counters(enc, &families, &rows)?;
    let mut family = enc.encode_descriptor(
        "lazyblob_registry_request_duration_seconds",
        "Time from sending a registry request to the end of its body",
        None,
        MetricType::Histogram,
    )?;
    for (host, op, stats) in &hosts {
        stats
            .latency
            .encode(family.encode_family(&[("host", host.as_str()), ("op", op)])?)?;
    }
    Ok(())
}

/// OpenMetrics text turned into the classic Prometheus text format: a counter family's
/// `HELP` and `TYPE` name its `_total` samples, and there is no `UNIT` or `EOF` line.
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line.starts_with("# EOF") || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.splitn(4, ' ').nth(3).unwrap_or("");
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Serve `GET /metrics` on `addr` until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    daemon: Weak<Daemon>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DaemonCollector(daemon)));
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let registry = Arc::clone(&registry);
            async move {
                // Prometheus asks for OpenMetrics; anything else (curl, `promtool check
                // metrics`) gets the classic text format
                let openmetrics = headers
                    .get(axum::http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.contains("application/openmetrics-text"));
                // the cache size is a directory scan: on the blocking pool, as for `status`
                let encoded = tokio::task::spawn_blocking(move || {
                    let mut body = String::new();
                    prometheus_client::encoding::text::encode(&mut body, &registry).map(|()| body)
                })
                .await;
                match encoded {
                    Ok(Ok(body)) if openmetrics => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                        .into_response(),
                    Ok(Ok(body)) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        classic(&body),
                    )
                        .into_response(),
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "encoding the metrics failed");
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the metrics task failed");
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response()
                    }
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics listening (GET /metrics)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_format_names_counters_by_their_samples() {
        let om = "# HELP a_bytes Bytes.\n# TYPE a_bytes counter\na_bytes_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
