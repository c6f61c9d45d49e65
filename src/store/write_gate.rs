//! One writer at a time per SQLite file, queued in memory.
//!
//! SQLite lets one connection write at a time. A connection that finds the write lock taken
//! waits in SQLite's busy handler, which sleeps 1, 2, 5, 10, … ms between tries and is not
//! fair: at 32 concurrent SCEP issuances each one slept ~2.9 times for ~8 ms on average
//! (strace), the cores idle meanwhile. Write transactions of this process on one database file
//! therefore first queue on an async FIFO lock, so the write lock is free when they ask for it
//! and nobody sleeps or polls. Readers never queue (WAL). The busy timeout stays for writers
//! in other processes (the CLI, a backup) and for single-statement writes outside a transaction.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use sqlx::SqlitePool;
use tokio::sync::OwnedMutexGuard;

type Gate = Arc<tokio::sync::Mutex<()>>;

/// Keyed by the database file: every pool this process opens on one file shares its gate.
static GATES: LazyLock<Mutex<HashMap<PathBuf, Gate>>> = LazyLock::new(Default::default);

/// Waits for this process's turn to write `pool`'s database; the turn ends when the guard drops.
pub(crate) async fn enter(pool: &SqlitePool) -> OwnedMutexGuard<()> {
    let gate = {
        let options = pool.connect_options();
        let path = options.get_filename();
        let mut gates = GATES.lock().unwrap_or_else(PoisonError::into_inner);
        match gates.get(path) {
            Some(gate) => gate.clone(),
            // The path is copied once per file, not on every write.
            None => gates.entry(path.to_path_buf()).or_default().clone(),
        }
    };
    gate.lock_owned().await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    use super::*;
    use crate::store::begin_write;

    /// A pool whose connections give up at once when the write lock is taken: any writer that
    /// reaches SQLite while another holds the lock fails with SQLITE_BUSY.
    async fn impatient_pool(path: &std::path::Path) -> SqlitePool {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::ZERO);
        SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .unwrap()
    }

    /// 64 write transactions at once, each holding the write lock across an await, on a
    /// database that never waits for its lock: all commit, because they took turns in memory.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_write_transactions_take_turns_instead_of_colliding() {
        let dir = tempfile::tempdir().unwrap();
        let pool = impatient_pool(&dir.path().join("gate.db")).await;
        sqlx::query("CREATE TABLE counter (n INTEGER NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO counter (n) VALUES (0)")
            .execute(&pool)
            .await
            .unwrap();
        let writers = (0..64).map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut tx = begin_write(&pool).await?;
                let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
                    .fetch_one(&mut *tx)
                    .await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
                sqlx::query("UPDATE counter SET n = ?")
                    .bind(n + 1)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await
            })
        });
        for writer in writers.collect::<Vec<_>>() {
            writer
                .await
                .unwrap()
                .expect("a writer collided with another");
        }
        let n: i64 = sqlx::query_scalar("SELECT n FROM counter")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(n, 64);
    }

    /// Two pools on one file share a turn; a pool on another file has its own.
    #[tokio::test]
    async fn pools_on_one_file_share_the_turn() {
        let dir = tempfile::tempdir().unwrap();
        let a = impatient_pool(&dir.path().join("one.db")).await;
        let b = impatient_pool(&dir.path().join("one.db")).await;
        let other = impatient_pool(&dir.path().join("other.db")).await;
        let turn = enter(&a).await;
        let waiting = tokio::time::timeout(Duration::from_millis(50), enter(&b)).await;
        assert!(
            waiting.is_err(),
            "a second pool on the same file wrote at the same time"
        );
        drop(
            tokio::time::timeout(Duration::from_millis(50), enter(&other))
                .await
                .expect("another file's writers waited for this one"),
        );
        drop(turn);
        drop(
            tokio::time::timeout(Duration::from_secs(5), enter(&b))
                .await
                .expect("the turn was not handed on"),
        );
    }
}
