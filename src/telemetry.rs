//! Logs (tracing) and metrics (Prometheus text) for the whole process.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global log subscriber. Safe to call more than once (later calls do nothing).
pub fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("invalid log filter '{filter}' ({e}); using 'info'");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Latency buckets (seconds) for request histograms: sub-millisecond to ten seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide metrics recorder, installed on first use. The recorder is global (the
/// `metrics` facade has one slot), so servers started in the same process share it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Fails only for an empty bucket list, which LATENCY_BUCKETS is not.
            #[allow(clippy::expect_used)]
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("latency buckets are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            metrics_process::Collector::default().describe();
            spawn_upkeep(handle.clone());
            handle
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The name of the thread that does it (the tests look for it).
const UPKEEP_THREAD: &str = "metrics-upkeep";

/// The recorder keeps every histogram sample until upkeep (or a scrape) folds it into the
/// buckets: without this, a broker nobody scrapes grows by every request it answers (~0.5 MiB/s
/// at 25,000 signed Idles/s). A thread of its own, not a task, because the recorder outlives
/// any one runtime (tests start many).
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name(UPKEEP_THREAD.into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_EVERY);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the metrics upkeep thread: histograms grow \
            until /metrics is scraped");
    }
}

/// Renders every metric, refreshing the process figures (CPU, memory, file descriptors) first.
pub fn render_metrics(handle: &PrometheusHandle) -> String {
    metrics_process::Collector::default().collect();
    handle.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without upkeep every histogram sample stays in memory until a scrape.
    #[test]
    fn histogram_upkeep_runs_without_a_scrape() {
        let _ = metrics_handle();
        let threads = || -> Vec<String> {
            std::fs::read_dir("/proc/self/task")
                .expect("Linux /proc")
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .map(|name| name.trim().to_owned())
                .collect()
        };
        // A new thread names itself once it runs: on a busy machine that can take a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !threads().iter().any(|name| name == UPKEEP_THREAD)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let threads = threads();
        assert!(
            threads.iter().any(|name| name == UPKEEP_THREAD),
            "no {UPKEEP_THREAD} thread among {threads:?}"
        );
    }
}
