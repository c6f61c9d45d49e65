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
        let path = pool.connect_options().get_filename().to_path_buf();
        let mut gates = GATES.lock().unwrap_or_else(PoisonError::into_inner);
        gates.entry(path).or_default().clone()
    };
    gate.lock_owned().await
}
