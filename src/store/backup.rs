//! Online backup of the embedded SQLite database.
//!
//! `VACUUM INTO` writes a transactionally consistent copy from one read snapshot while the
//! server keeps serving (WAL readers do not block writers), so no pause and no file copying of
//! a live database, whose WAL and main file could be caught mid-checkpoint. It is SQLite's
//! own online copy; sqlx does not expose the page-stepping backup API, and for a database of
//! this size one snapshot is what an operator wants anyway.

use std::path::{Path, PathBuf};

use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use super::{Pool, Store, StoreError, StoreResult};

/// What a backup wrote.
#[derive(Clone, Debug)]
pub struct BackupReport {
    pub path: PathBuf,
    pub bytes: u64,
}

impl Store {
    /// Writes a consistent copy of the serving SQLite database to `dest` (which must not exist),
    /// checks the copy, and only then gives it its name. PostgreSQL is backed up with
    /// `pg_dump` (docs/operations.md), so this refuses there.
    pub async fn backup_sqlite(&self, dest: &Path) -> StoreResult<BackupReport> {
        let Pool::Sqlite(pool) = &self.pool else {
            return Err(StoreError::Backup(
                "this is a PostgreSQL database: back it up with pg_dump (docs/operations.md)"
                    .into(),
            ));
        };
        if dest.exists() {
            return Err(StoreError::Backup(format!(
                "{} already exists; choose a new file",
                dest.display()
            )));
        }
        let partial = partial_path(dest);
        // The copy holds sealed secrets and personal data: private from its first byte.
        create_private_empty(&partial)?;
        let written = async {
            sqlx::query("VACUUM INTO $1")
                .bind(partial.to_string_lossy().into_owned())
                .execute(pool)
                .await?;
            check_copy(&partial).await
        }
        .await;
        if let Err(e) = written {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        std::fs::rename(&partial, dest).map_err(|e| io_error(dest, e))?;
        let bytes = std::fs::metadata(dest)
            .map_err(|e| io_error(dest, e))?
            .len();
        Ok(BackupReport {
            path: dest.to_path_buf(),
            bytes,
        })
    }
}

fn partial_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    dest.with_file_name(name)
}

fn create_private_empty(path: &Path) -> StoreResult<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop).map_err(|e| io_error(path, e))
}

/// Opens the copy on its own and runs SQLite's structural check over every page.
async fn check_copy(path: &Path) -> StoreResult<()> {
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .connect()
        .await?;
    let verdict: String = sqlx::query_scalar("PRAGMA quick_check")
        .fetch_one(&mut conn)
        .await?;
    drop(conn);
    if verdict == "ok" {
        Ok(())
    } else {
        Err(StoreError::Backup(format!(
            "the copy failed SQLite's check ({verdict}); the database itself may be damaged"
        )))
    }
}

fn io_error(path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backup(format!("{}: {e}", path.display()))
}
