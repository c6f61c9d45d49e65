//! SQLite's WAL checkpoints, off the request path.
//!
//! By default SQLite checkpoints (copies the write-ahead log back into the database file and
//! fsyncs both) inside the COMMIT of whichever connection pushed the log past 1,000 pages: that
//! request waits for the disk. Under a steady write load (SCEP issuance at several hundred per
//! second) this was the slow tail: a few commits of 100–460 ms among thousands of 2 ms ones.
//!
//! Here each connection's automatic checkpoint is raised to a backstop it only reaches if this
//! task has stopped ([`AUTOCHECKPOINT_BACKSTOP_PAGES`]), and a background task runs a PASSIVE
//! checkpoint every [`INTERVAL`] on a pool connection: it never waits for readers or writers,
//! and copies each changed page once however often it was written in between.
//!
//! A PASSIVE checkpoint never empties the log while writes go on: SQLite starts the log over
//! only when a writer begins with every frame already copied, which under a steady load does
//! not happen (at 1,400 SCEP issuances/s the log grew by ~90 MiB/s). So once the log is
//! [`RESTART_AT_PAGES`] long the task restarts it: it syncs the database file first, from a
//! descriptor of its own and without any lock, so that little is left to sync; then it takes
//! this process's write turn (`write_gate`), so that writers wait in line rather than in
//! SQLite's busy handler, whose 5, 10, 15 ms sleeps used to stretch each restart to ~35 ms
//! for every request in flight; and runs a RESTART checkpoint, which copies the few frames
//! left, waits for the readers of the moment (at most [`RESTART_PATIENCE`]; a longer reader
//! such as a backup makes it try again after [`RESTART_BACKOFF`]) and lets the next writer
//! write from the start of the file. A file grown past [`TRUNCATE_AT_PAGES`] (readers held the
//! log long) is truncated instead, giving the disk back.
//!
//! Durability is unchanged: a transaction is durable when its COMMIT has written the log
//! (`synchronous = NORMAL`, as before), whoever later checkpoints it.

use std::time::Duration;

use sqlx::SqlitePool;

/// How often the background checkpoint runs.
pub(super) const INTERVAL: Duration = Duration::from_millis(500);

/// A log this long (pages of 4 KiB: 16 MiB) after a PASSIVE checkpoint is restarted.
pub(super) const RESTART_AT_PAGES: i64 = 4_096;

/// A log file this long (64 MiB) is truncated when restarted, not reused.
pub(super) const TRUNCATE_AT_PAGES: i64 = 16_384;

/// Each connection's `wal_autocheckpoint`: far above what the background task lets the log
/// reach, so a commit checkpoints only if that task is gone (SQLite's default is 1,000).
pub(super) const AUTOCHECKPOINT_BACKSTOP_PAGES: u32 = 4 * TRUNCATE_AT_PAGES as u32;

/// Stops the checkpoint task when the last clone of the store is dropped.
#[derive(Debug)]
pub(super) struct Checkpointer(tokio::task::JoinHandle<()>);

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Checkpointer {
    pub(super) fn start(pool: SqlitePool) -> Checkpointer {
        Checkpointer(tokio::spawn(run(pool)))
    }
}

/// What `PRAGMA wal_checkpoint` answers: whether it was blocked, the pages in the log, and how
/// many of them are now in the database file.
#[derive(Debug, sqlx::FromRow)]
pub(super) struct Checkpoint {
    busy: i64,
    log: i64,
    checkpointed: i64,
}

async fn run(pool: SqlitePool) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    let mut restarts = Restarts::default();
    loop {
        ticks.tick().await;
        if pool.is_closed() {
            return;
        }
        let now = tokio::time::Instant::now();
        match tick(&pool, restarts.at(now), TRUNCATE_AT_PAGES).await {
            Ok(done) => {
                failing = false;
                restarts.after(&done, now);
                tracing::trace!(
                    busy = done.busy,
                    log = done.log,
                    checkpointed = done.checkpointed,
                    "SQLite: WAL checkpoint"
                );
            }
            Err(_) if pool.is_closed() => return,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "SQLite: background WAL checkpoint failed; retrying");
            }
            Err(_) => {}
        }
    }
}

/// When the rounds may restart the log.
#[derive(Default)]
struct Restarts {
    paused_until: Option<tokio::time::Instant>,
}

impl Restarts {
    /// The log length (pages) at which a round starting `now` restarts the log.
    fn at(&self, now: tokio::time::Instant) -> i64 {
        match self.paused_until {
            Some(until) if now < until => i64::MAX,
            _ => RESTART_AT_PAGES,
        }
    }

    /// A reader outlasted the restart's patience (a backup, say): writers paid up to
    /// RESTART_PATIENCE for nothing, so they are spared that for RESTART_BACKOFF.
    fn after(&mut self, done: &Checkpoint, now: tokio::time::Instant) {
        if done.busy != 0 {
            self.paused_until = Some(now + RESTART_BACKOFF);
        }
    }
}

/// One round: a PASSIVE checkpoint and, when the log is `restart_at` pages or longer, a
/// RESTART one in this process's write turn (TRUNCATE when the file is `truncate_at` pages or
/// longer).
async fn tick(
    pool: &SqlitePool,
    restart_at: i64,
    truncate_at: i64,
) -> Result<Checkpoint, sqlx::Error> {
    let done: Checkpoint = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await?;
    if done.log < restart_at {
        return Ok(done);
    }
    let database = pool.connect_options().get_filename().to_owned();
    let log_file = log_path(&database);
    let (truncate, synced) = tokio::task::spawn_blocking(move || {
        let truncate = std::fs::metadata(&log_file)
            .is_ok_and(|m| m.len() >= truncate_at.unsigned_abs() * PAGE_BYTES);
        // Only makes the sync inside the turn shorter: a failure here changes nothing else.
        let synced = std::fs::File::open(&database).and_then(|file| file.sync_data());
        (truncate, synced)
    })
    .await
    .unwrap_or((false, Ok(())));
    if let Err(e) = synced {
        tracing::debug!(error = %e, "SQLite: could not sync the database file before a restart");
    }
    // The turn before the connection, as `begin_write` does: a writer holding the turn and
    // waiting for a connection would otherwise wait for this one, held here for the turn.
    let _turn = super::write_gate::enter(pool).await;
    let mut connection = pool.acquire().await?;
    let mode = if truncate {
        tracing::info!(
            pages = done.log,
            "SQLite: the write-ahead log file grew past its bound; truncating it"
        );
        "PRAGMA wal_checkpoint(TRUNCATE)"
    } else {
        "PRAGMA wal_checkpoint(RESTART)"
    };
    // Writers wait while the checkpoint waits for readers: not longer than RESTART_PATIENCE (a
    // backup's long read would otherwise hold them for the whole busy timeout). The next
    // round tries again.
    let restarted = async {
        set_busy_timeout(&mut connection, RESTART_PATIENCE).await?;
        let done = sqlx::query_as(mode).fetch_one(&mut *connection).await;
        set_busy_timeout(&mut connection, super::SQLITE_BUSY_TIMEOUT).await?;
        done
    }
    .await;
    if restarted.is_err() {
        // Its busy timeout may not be the pool's any more.
        connection.close_on_drop();
    }
    restarted
}

/// How long a restart waits for the readers of the moment, with writers waiting behind it.
const RESTART_PATIENCE: Duration = Duration::from_millis(100);

/// After a restart that readers kept from happening, how long until the next try: writers
/// lose at most RESTART_PATIENCE in this much time while a long read lasts.
const RESTART_BACKOFF: Duration = Duration::from_secs(2);

async fn set_busy_timeout(
    connection: &mut sqlx::SqliteConnection,
    timeout: Duration,
) -> Result<(), sqlx::Error> {
    // A number of our own, not input.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "PRAGMA busy_timeout = {}",
        timeout.as_millis()
    )))
    .execute(connection)
    .await
    .map(|_| ())
}

/// The page size `RESTART_AT_PAGES` and `TRUNCATE_AT_PAGES` count in (SQLite's default).
const PAGE_BYTES: u64 = 4_096;

/// SQLite's name for a database's write-ahead log.
fn log_path(database: &std::path::Path) -> std::path::PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-wal");
    std::path::PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pool(dir: &tempfile::TempDir) -> SqlitePool {
        pool_of(dir, 2).await
    }

    async fn pool_of(dir: &tempfile::TempDir, connections: u32) -> SqlitePool {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(connections)
            .connect_with(super::super::sqlite_options(&dir.path().join("wal.db")))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE filler (b BLOB)")
            .execute(&pool)
            .await
            .unwrap();
        pool
    }

    /// Writes `pages` pages of 4 KiB, one commit each.
    async fn fill(pool: &SqlitePool, pages: usize) {
        for _ in 0..pages {
            sqlx::query("INSERT INTO filler (b) VALUES (zeroblob(3000))")
                .execute(pool)
                .await
                .unwrap();
        }
    }

    fn size(path: std::path::PathBuf) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    /// No commit checkpoints at SQLite's default 1,000 pages: the database file only grows when
    /// the background task copies the log into it.
    #[tokio::test]
    async fn commits_leave_checkpoints_to_the_background_task() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        let (a, b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
        for mut connection in [a, b] {
            let backstop: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
                .fetch_one(&mut *connection)
                .await
                .unwrap();
            assert_eq!(backstop, i64::from(AUTOCHECKPOINT_BACKSTOP_PAGES));
        }
        fill(&pool, 1_500).await;
        let db = dir.path().join("wal.db");
        assert!(size(db.clone()) < 100_000, "a commit checkpointed");
        assert!(size(dir.path().join("wal.db-wal")) > 1_500 * 4_096);

        let _task = Checkpointer::start(pool.clone());
        let mut waited = 0;
        while size(db.clone()) < 1_500 * 3_000 {
            assert!(waited < 200, "the background task never checkpointed");
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        pool.close().await;
    }

    /// A database whose log holds 50 frames, on a pool of `connections`.
    async fn with_a_long_log(connections: u32) -> (tempfile::TempDir, SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool_of(&dir, connections).await;
        fill(&pool, 50).await;
        (dir, pool)
    }

    /// The number of frames in the log, as a PASSIVE checkpoint reports it.
    async fn log_frames(pool: &SqlitePool) -> i64 {
        let done: Checkpoint = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_one(pool)
            .await
            .unwrap();
        done.log
    }

    /// A short log is checkpointed and left; a long one is restarted, so the next writes go
    /// to the start of the file instead of growing it.
    #[tokio::test]
    async fn a_long_log_is_restarted() {
        let (dir, pool) = with_a_long_log(2).await;
        let wal = dir.path().join("wal.db-wal");
        let done = tick(&pool, 1_000, 1_000_000).await.unwrap();
        assert_eq!((done.busy, done.checkpointed), (0, done.log), "{done:?}");
        assert!(done.log >= 50, "{done:?}");
        assert!(log_frames(&pool).await >= 50, "a short log was restarted");

        let done = tick(&pool, 10, 1_000_000).await.unwrap();
        assert_eq!(done.busy, 0, "{done:?}");
        let file = size(wal.clone());
        assert!(file > 50 * 4_096, "a restart must not truncate the file");
        fill(&pool, 5).await;
        let frames = log_frames(&pool).await;
        assert!(
            (5..50).contains(&frames),
            "the log went on from frame {frames}"
        );
        assert_eq!(size(wal), file, "the writes after a restart grew the file");
        pool.close().await;
    }

    /// A log file grown past the bound is truncated when the log is restarted.
    #[tokio::test]
    async fn a_long_log_file_is_truncated() {
        let (dir, pool) = with_a_long_log(2).await;
        let wal = dir.path().join("wal.db-wal");
        let done = tick(&pool, 10, 20).await.unwrap();
        assert_eq!(done.log, 0, "{done:?}");
        assert_eq!(size(wal), 0);
        pool.close().await;
    }

    /// A round that restarts the log, on a task of its own.
    fn restart_in_background(
        pool: &SqlitePool,
    ) -> tokio::task::JoinHandle<Result<Checkpoint, sqlx::Error>> {
        let pool = pool.clone();
        tokio::spawn(async move { tick(&pool, 10, 1_000_000).await })
    }

    /// What that round answered, once it has run.
    async fn restarted(
        restart: tokio::task::JoinHandle<Result<Checkpoint, sqlx::Error>>,
    ) -> Checkpoint {
        tokio::time::timeout(Duration::from_secs(10), restart)
            .await
            .expect("the restart never ran")
            .unwrap()
            .unwrap()
    }

    /// The restart waits for this process's writer to finish (in line, not in SQLite's busy
    /// handler).
    #[tokio::test]
    async fn a_restart_takes_the_write_turn() {
        let (_dir, pool) = with_a_long_log(2).await;
        let turn = crate::store::write_gate::enter(&pool).await;
        let restart = restart_in_background(&pool);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !restart.is_finished(),
            "the restart did not wait for the writer"
        );
        drop(turn);
        let done = restarted(restart).await;
        assert_eq!(done.busy, 0, "{done:?}");
        fill(&pool, 5).await;
        assert!(log_frames(&pool).await < 50, "the log was not restarted");
        pool.close().await;
    }

    /// A reader that keeps the log (a backup, say) makes the restart give up after
    /// RESTART_PATIENCE, not the 5 s busy timeout: writers behind it are not held that long,
    /// and the connection keeps the pool's busy timeout.
    #[tokio::test]
    async fn a_restart_does_not_wait_long_for_a_reader() {
        let (_dir, pool) = with_a_long_log(2).await;
        let mut reader = pool.acquire().await.unwrap();
        sqlx::query("BEGIN").execute(&mut *reader).await.unwrap();
        let _: i64 = sqlx::query_scalar("SELECT count(*) FROM filler")
            .fetch_one(&mut *reader)
            .await
            .unwrap();
        fill(&pool, 20).await;
        let started = std::time::Instant::now();
        let done = tick(&pool, 10, 1_000_000).await.unwrap();
        assert_eq!(done.busy, 1, "{done:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the restart waited {:?}",
            started.elapsed()
        );
        sqlx::query("COMMIT").execute(&mut *reader).await.unwrap();
        drop(reader);
        let (a, b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
        for mut connection in [a, b] {
            let timeout: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                .fetch_one(&mut *connection)
                .await
                .unwrap();
            assert_eq!(timeout, 5_000);
        }
        pool.close().await;
    }

    /// With one connection in the pool, a writer holding the turn still gets it: the restart
    /// waits for the turn before it takes a connection, as every writer does.
    #[tokio::test]
    async fn a_restart_waiting_for_the_turn_holds_no_connection() {
        let (_dir, pool) = with_a_long_log(1).await;
        let turn = crate::store::write_gate::enter(&pool).await;
        let restart = restart_in_background(&pool);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let writer = tokio::time::timeout(Duration::from_secs(2), pool.acquire())
            .await
            .expect("the waiting restart holds the only connection")
            .unwrap();
        drop(writer);
        drop(turn);
        let done = restarted(restart).await;
        assert_eq!(done.busy, 0, "{done:?}");
        pool.close().await;
    }

    /// A restart that readers kept from happening pauses restarts for RESTART_BACKOFF.
    #[test]
    fn a_busy_restart_pauses_the_next_ones() {
        let start = tokio::time::Instant::now();
        let mut restarts = Restarts::default();
        assert_eq!(restarts.at(start), RESTART_AT_PAGES);
        let done = |busy| Checkpoint {
            busy,
            log: 5_000,
            checkpointed: 5_000,
        };
        restarts.after(&done(0), start);
        assert_eq!(restarts.at(start), RESTART_AT_PAGES);
        restarts.after(&done(1), start);
        assert_eq!(restarts.at(start + INTERVAL), i64::MAX);
        assert_eq!(restarts.at(start + RESTART_BACKOFF), RESTART_AT_PAGES);
    }
}
