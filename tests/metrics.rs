//! The Prometheus endpoint against a real Prometheus (Debian's `prometheus`): the daemon
//! (fanotify, this machine's kernel) serves an image from registry-mock, a few files are
//! read lazily, `promtool check metrics` accepts the endpoint's output, and Prometheus,
//! scraping it every second, answers queries with the bytes read, the bytes fetched and
//! the cold-read latency histogram, the same per image and per registry host (adding up to
//! the totals), registry request latency, and evaluates every query of the shipped Grafana
//! dashboard (`deploy/grafana/lazyblob-dashboard.json`); the unmount's evictions under a
//! tiny cache limit are counted.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::daemon::DaemonProc;
use common::*;
use registry_mock::{MockConfig, MockRegistry};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Prometheus ended (and its data removed) on drop.
struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        common::procs::terminate(&mut self.0, Duration::from_secs(10));
    }
}

/// The endpoint's text, as `curl` gets it.
async fn scrape(http: &reqwest::Client, port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// The answer of a Prometheus instant query.
async fn query_json(http: &reqwest::Client, prom: u16, q: &str) -> Option<serde_json::Value> {
    let url = format!("http://127.0.0.1:{prom}/api/v1/query");
    http.get(url)
        .query(&[("query", q)])
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// The value of a Prometheus instant query with one result, once it has one.
async fn query(http: &reqwest::Client, prom: u16, q: &str) -> Option<f64> {
    let v = query_json(http, prom, q).await?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_what_lazy_reads_did() {
    require_root();
    require_tool("prometheus", "prometheus");
    require_tool("promtool", "prometheus");
    let mock = MockRegistry::start(MockConfig::default()).await.unwrap();
    let host = mock.host();
    let reg = client(&insecure_config(&[&host]));
    let files = mixed_files(7, 20, &[4]);
    push_image(&reg, &host, "metrics/app:v1", &build_files(&files, 2)).await;

    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = DaemonProc::start(
        &work.path().join("d"),
        &[&host],
        // a 1-byte cache limit: the unmount at the end evicts the image's blobs
        &format!("frontend = \"fanotify\"\ncache_limit_bytes = 1\n[metrics]\naddress = \"127.0.0.1:{port}\""),
    );
    let mnt = work.path().join("d/mnt");
    d.mount(&format!("{host}/metrics/app:v1"), &mnt);
    let mut read = 0u64;
    for (p, want) in files.iter().take(6) {
        assert_eq!(&std::fs::read(mnt.join(p)).unwrap(), want, "{p}");
        read += want.len() as u64;
    }

    // the endpoint: well-formed for promtool, and what the reads did
    let http = reqwest::Client::new();
    let body = scrape(&http, port).await;
    // promtool accepts the exposition
    common::procs::run_ok_fed(Command::new("promtool").args(["check", "metrics"]), body.as_bytes());
    for name in [
        "lazyblob_read_bytes_total",
        "lazyblob_registry_bytes_total",
        "lazyblob_eio_answers_total",
        "lazyblob_chunks_in_flight",
        "lazyblob_mounts 1",
        "lazyblob_read_duration_seconds_count{frontend=\"fanotify\",path=\"cold\"}",
        &format!("lazyblob_image_read_bytes_total{{image=\"{host}/metrics/app:v1\"}}"),
        &format!("lazyblob_image_fetched_bytes_total{{image=\"{host}/metrics/app:v1\"}}"),
        &format!("lazyblob_registry_host_requests_total{{host=\"{host}\",op=\"range\"}}"),
        &format!("lazyblob_registry_request_duration_seconds_count{{host=\"{host}\",op=\"manifest\"}}"),
        "lazyblob_cache_evicted_blobs_total 0",
        "lazyblob_fetch_ahead_pauses_total",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    // chunks fetched ahead of readers, by what fetched them: the same numbers as the
    // frontend's own counters in `status` (read back to back until the background fill, which
    // may be running, leaves them alike)
    let ahead = |body: &str, by: &str| -> u64 {
        let series = format!("lazyblob_chunks_ahead_total{{frontend=\"fanotify\",by=\"{by}\"}} ");
        let line = body.lines().find_map(|l| l.strip_prefix(series.as_str()));
        line.unwrap_or_else(|| panic!("{series}missing:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    };
    let kinds = [
        ("read_ahead", "chunks_prefetched"),
        ("startup", "chunks_startup"),
        ("background", "chunks_background"),
    ];
    let t0 = Instant::now();
    loop {
        let (status, body) = (d.status().await, scrape(&http, port).await);
        let pairs: Vec<(u64, Option<u64>)> = kinds
            .iter()
            .map(|(by, counter)| (ahead(&body, by), status.frontend_counters[*counter].as_u64()))
            .collect();
        if pairs.iter().all(|(scraped, own)| Some(*scraped) == *own) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "lazyblob_chunks_ahead (read_ahead, startup, background) against status: {pairs:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // a real Prometheus scrapes it
    let prom_port = free_port();
    let cfg = work.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: lazyblob\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(work.path().join("prometheus.log")).unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", work.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    let (served, fetched, cold) = loop {
        let served = query(&http, prom_port, "lazyblob_read_bytes_total").await;
        let fetched = query(&http, prom_port, "lazyblob_registry_bytes_total").await;
        let cold = query(&http, prom_port, "lazyblob_read_duration_seconds_count{path=\"cold\"}").await;
        if let (Some(s), Some(f), Some(c)) = (served, fetched, cold) {
            break (s, f, c);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "Prometheus never had the metrics:\n{}",
            std::fs::read_to_string(work.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("Prometheus: {served} bytes read, {fetched} fetched, {cold} cold reads; the test read {read} bytes");
    assert!(served > 0.0 && fetched > 0.0 && cold > 0.0);
    // the kernel reads whole pages and read-ahead windows: at least what the test read
    assert!(served >= read as f64, "{served} bytes served for {read} read");
    // per image (one image here: all of it) and per host (the sum is the total)
    let image = format!("{{image=\"{host}/metrics/app:v1\"}}");
    let of_image = query(&http, prom_port, &format!("lazyblob_image_read_bytes_total{image}")).await;
    assert_eq!(of_image, Some(served), "bytes read of the image");
    let image_fetched = query(&http, prom_port, &format!("lazyblob_image_fetched_bytes_total{image}"))
        .await
        .unwrap();
    assert!(
        image_fetched > 0.0 && image_fetched <= fetched,
        "{image_fetched} of {fetched}"
    );
    let by_host = query(&http, prom_port, "sum(lazyblob_registry_host_requests_total)").await;
    let total = query(&http, prom_port, "lazyblob_registry_requests_total").await;
    assert_eq!(by_host, total, "requests by host add up to the total");
    let timed = query(
        &http,
        prom_port,
        "sum(lazyblob_registry_request_duration_seconds_count{op=\"range\"})",
    )
    .await;
    assert!(timed.is_some_and(|n| n > 0.0), "no range request timed");
    // every query of the shipped Grafana dashboard is one this Prometheus evaluates
    let dash: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/lazyblob-dashboard.json")).unwrap(),
    )
    .unwrap();
    for expr in dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap())
    {
        let v = query_json(&http, prom_port, expr).await;
        assert_eq!(
            v.as_ref().map(|v| v["status"].clone()),
            Some("success".into()),
            "dashboard query {expr}: {v:?}"
        );
    }
    d.umount(&mnt);
    // the unmount applied the cache limit: its evictions are counted
    let t0 = Instant::now();
    loop {
        let body = scrape(&http, port).await;
        let evicted = body
            .lines()
            .find_map(|l| l.strip_prefix("lazyblob_cache_evicted_blobs_total "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if evicted.is_some_and(|n| n >= 2.0) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no eviction counted:\n{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
