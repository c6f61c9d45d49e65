//! SQLite's WAL checkpoints, off the request path.
//!
//! By default SQLite checkpoints (copies the write-ahead log back into the database file and
//! fsyncs both) inside the COMMIT of whichever connection pushed the log past 1,000 pages: that
//! request waits for the disk. Under a steady write load (SCEP issuance at several hundred per
//! second) this was the slow tail: a few commits of 100–460 ms among thousands of 2 ms ones.
//!
//! Here each connection's automatic checkpoint is raised to a backstop it only reaches if this
//! task has stopped ([`AUTOCHECKPOINT_BACKSTOP_PAGES`]), and a background task runs a PASSIVE
//! checkpoint every [`INTERVAL`] on a pool connection of its own: it never waits for readers or
//! writers, and copies each changed page once however often it was written in between. When
//! readers keep the log from being reset and it grows past [`TRUNCATE_AT_PAGES`], the task
//! runs a TRUNCATE checkpoint, which waits (within the busy timeout) for the readers of the
//! moment to finish and empties the file, so the log stays bounded.
//!
//! Durability is unchanged: a transaction is durable when its COMMIT has written the log
//! (`synchronous = NORMAL`, as before), whoever later checkpoints it.

use std::time::Duration;

use sqlx::SqlitePool;

/// How often the background checkpoint runs.
pub(super) const INTERVAL: Duration = Duration::from_millis(500);

/// A log this long (pages of 4 KiB: 64 MiB) after a PASSIVE checkpoint means readers kept it
/// from being reset: the next checkpoint truncates it.
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
    loop {
        ticks.tick().await;
        if pool.is_closed() {
            return;
        }
        match tick(&pool, TRUNCATE_AT_PAGES).await {
            Ok(done) => {
                failing = false;
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

/// One round: a PASSIVE checkpoint, and a TRUNCATE one when the log is `truncate_at` pages
/// or longer.
async fn tick(pool: &SqlitePool, truncate_at: i64) -> Result<Checkpoint, sqlx::Error> {
    let done: Checkpoint = sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
        .fetch_one(pool)
        .await?;
    if done.log < truncate_at {
        return Ok(done);
    }
    tracing::info!(
        pages = done.log,
        "SQLite: readers kept the write-ahead log from being reset; truncating it"
    );
    sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
        .fetch_one(pool)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pool(dir: &tempfile::TempDir) -> SqlitePool {
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(2)
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

    /// A log readers kept long is truncated; a short one is checkpointed and left.
    #[tokio::test]
    async fn a_long_log_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let pool = pool(&dir).await;
        let wal = dir.path().join("wal.db-wal");
        fill(&pool, 50).await;
        let done = tick(&pool, 1_000).await.unwrap();
        assert_eq!((done.busy, done.checkpointed), (0, done.log), "{done:?}");
        assert!(done.log >= 50, "{done:?}");
        assert!(size(wal.clone()) > 50 * 4_096);
        let done = tick(&pool, 10).await.unwrap();
        assert_eq!(done.log, 0, "{done:?}");
        assert_eq!(size(wal), 0);
        pool.close().await;
    }
}
