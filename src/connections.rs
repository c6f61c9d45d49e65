//! Bounding connections: how many a listener holds, and how long one may sit without work.
//!
//! A client that connects and sends nothing, half an HTTP/2 preface, or opens HTTP/2 and idles,
//! costs a file descriptor and some memory for as long as we let it. Each listener therefore
//! holds at most `server.max_connections` (more are accepted and closed at once, before any TLS
//! work), and every connection is watched: until its first request (`first_request_timeout`)
//! and whenever no request is in flight (`idle_timeout`) a deadline runs, after which the
//! connection is shut down gracefully and, if the peer does not let go, dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::config::ServerSettings;

/// How long a connection we asked to close (GOAWAY, or `Connection: close` at the next
/// response) may take to go before it is dropped: an HTTP/2 peer that never answers the
/// shutdown PING would otherwise keep it open.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// At most one "connections refused" log line per listener in this period.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// File descriptors kept for everything but client connections (database pool, log files,
/// outgoing connections to APNs and identity providers).
const FD_RESERVE: usize = 512;

/// The connection slots of one listener.
pub struct ListenerGate {
    listener: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    born: Instant,
    /// Milliseconds since `born` of the last refusal log line (0: never), and refusals since.
    last_log_ms: AtomicU64,
    refused_since_log: AtomicU64,
}

impl ListenerGate {
    pub fn new(listener: &'static str, max: usize) -> ListenerGate {
        // Exported from the start at zero, so rate() and alerts see the first refusal.
        metrics::counter!("trustbroker_connections_refused_total", "listener" => listener)
            .increment(0);
        ListenerGate {
            listener,
            max,
            slots: Arc::new(Semaphore::new(max)),
            born: Instant::now(),
            last_log_ms: AtomicU64::new(0),
            refused_since_log: AtomicU64::new(0),
        }
    }

    /// A slot for a new connection, or `None` (counted and logged, rate-limited) when full.
    pub fn admit(&self) -> Option<ConnectionSlot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => {
                metrics::gauge!("trustbroker_connections_open", "listener" => self.listener)
                    .increment(1.0);
                Some(ConnectionSlot {
                    listener: self.listener,
                    _permit: permit,
                })
            }
            Err(_) => {
                self.refused();
                None
            }
        }
    }

    fn refused(&self) {
        metrics::counter!("trustbroker_connections_refused_total", "listener" => self.listener)
            .increment(1);
        let refused = self.refused_since_log.fetch_add(1, Ordering::Relaxed) + 1;
        let now_ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_log_ms.load(Ordering::Relaxed);
        let period_ms = u64::try_from(REFUSAL_LOG_PERIOD.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now_ms.saturating_sub(last) >= period_ms;
        if due
            && self
                .last_log_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refused_since_log.fetch_sub(refused, Ordering::Relaxed);
            tracing::warn!(
                listener = self.listener,
                max_connections = self.max,
                refused,
                "connection limit reached: new connections are closed at once"
            );
        }
    }

    /// Waits until every connection of this listener has ended.
    pub async fn drained(&self) {
        let all = u32::try_from(self.max).unwrap_or(u32::MAX);
        let _ = self.slots.acquire_many(all).await;
    }
}

/// A connection's place in its listener's limit, given back when dropped.
pub struct ConnectionSlot {
    listener: &'static str,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        metrics::gauge!("trustbroker_connections_open", "listener" => self.listener).decrement(1.0);
    }
}

/// What a connection is doing: requests in flight, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    born: Instant,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Milliseconds since `born` when the last request in flight ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            born: Instant::now(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// When the connection has been without work for too long: `None` while a request is in
    /// flight.
    fn idle_deadline(&self, settings: &ServerSettings) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let limit = if self.requests.load(Ordering::Relaxed) == 0 {
            settings.first_request_timeout()
        } else {
            settings.idle_timeout()
        };
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.born + since + limit)
    }
}

/// A request in flight on a connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Written by every request that ends, before the count drops: when it reaches zero the
        // watchdog never sees a stale time.
        self.0.idle_since_ms.fetch_max(now, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Drives `connection` to its end, shutting it down gracefully when it has waited too long for
/// its first request, has been idle too long, or the server stops; one that has not closed
/// [`CLOSE_GRACE`] later, and has no request in flight, is dropped.
pub async fn supervise<C, E>(
    mut connection: Pin<&mut C>,
    graceful_shutdown: impl Fn(Pin<&mut C>),
    activity: &Activity,
    settings: &ServerSettings,
    mut stop: watch::Receiver<bool>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    let mut stopping = *stop.borrow();
    let mut closing_since: Option<Instant> = None;
    if stopping {
        graceful_shutdown(connection.as_mut());
        closing_since = Some(Instant::now());
    }
    loop {
        let now = Instant::now();
        let wake = match (closing_since, activity.idle_deadline(settings)) {
            (Some(since), _) => since + CLOSE_GRACE,
            // Busy: look again after an idle period (the deadline moves when it ends).
            (None, None) => now + settings.idle_timeout(),
            (None, Some(deadline)) => deadline,
        };
        tokio::select! {
            result = connection.as_mut() => return result,
            _ = stop.changed(), if !stopping => {
                // Requests in flight may finish (the server's grace period bounds them); an
                // idle connection that does not go is dropped like any other.
                stopping = true;
                if closing_since.is_none() {
                    graceful_shutdown(connection.as_mut());
                    closing_since = Some(Instant::now());
                }
            }
            _ = tokio::time::sleep_until(wake.into()) => {
                let idle = activity.idle_deadline(settings).is_some_and(|d| d <= Instant::now());
                match closing_since {
                    // Asked to close and still here with nothing in flight: drop it.
                    Some(_) if activity.in_flight.load(Ordering::Acquire) == 0 => {
                        metrics::counter!("trustbroker_connections_dropped_total").increment(1);
                        return Ok(());
                    }
                    Some(_) => closing_since = Some(Instant::now()),
                    None if idle => {
                        let reason = if activity.requests.load(Ordering::Relaxed) == 0 {
                            "no_request"
                        } else {
                            "idle"
                        };
                        metrics::counter!("trustbroker_connections_timed_out_total", "reason" => reason)
                            .increment(1);
                        graceful_shutdown(connection.as_mut());
                        closing_since = Some(Instant::now());
                    }
                    None => {}
                }
            }
        }
    }
}

/// The soft limit on open files of this process, where the platform tells it.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `configured` connections per listener, lowered (with a warning) so that `listeners` of them
/// together stay below the process's file descriptor limit: past it, accept fails for everyone
/// alike, honest devices and attackers, while a limit refuses only the excess.
pub fn connections_within_fd_limit(configured: usize, listeners: usize) -> usize {
    let Some(fds) = open_files_limit() else {
        return configured;
    };
    let fit = fds.saturating_sub(FD_RESERVE) / listeners.max(1);
    if configured > fit {
        let lowered = fit.max(1);
        tracing::warn!(
            configured,
            lowered,
            open_files_limit = fds,
            listeners,
            "server.max_connections lowered to fit the open-files limit; raise the limit \
             (LimitNOFILE=, ulimit -n) to allow more"
        );
        lowered
    } else {
        configured
    }
}
