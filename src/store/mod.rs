//! Persistent state: one sqlx pool on SQLite (the embedded default) or PostgreSQL (the scale
//! path), with the same schema in each dialect under `migrations/`. Each aggregate keeps its
//! queries in its own file; nothing outside `store` sees `sqlx`.
//!
//! Queries are written once, with `$N` placeholders that both SQLite and PostgreSQL accept, and
//! run on whichever pool is open through [`on_pool!`]: the macro expands the same code for both
//! drivers, so the two backends cannot drift apart query by query.

mod admin_keys;
mod audit;
mod backup;
mod console;
mod device_tokens;
mod directory;
mod generation;
mod leases;
mod lifecycle;
mod loopback_tls;
mod mdm;
mod pki;
mod policy;
mod portal;
mod schema;
mod scim;
mod states;
mod tokens;
mod users;
mod wal;
mod write_gate;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

pub use admin_keys::{AdminKeyRecord, NewAdminKey};
pub use audit::{AuditEntry, AuditQuery, NewAuditEntry};
pub use backup::BackupReport;
pub use console::{AuditSearch, CONSOLE_PAGE_MAX, DeviceCount, DeviceFilter, DeviceRow, PersonRow};
pub use device_tokens::{
    DEVICE_TOKEN_ACTIVE, DEVICE_TOKEN_REVOKED, DeviceTokenInsert, DeviceTokenRow,
    DeviceTokenStanding, NewTokenSigningKey, SigningKeyStatus, TokenSigningKeyRow,
    UnknownSigningKeyStatus,
};
pub use directory::{DirectoryDetails, DirectoryUser, MembershipDelta, StatusChange};
pub use generation::{Generations, LocalChanges};
pub use leases::LeaseRow;
pub use lifecycle::{
    AUDIT_ENROLL, AUDIT_REENROLL, AUDIT_RETIRE, BindRefusal, Bound, EnrollmentSpan, RetireRequest,
    Retirement,
};
pub use mdm::{
    CertificateStanding, ChannelState, CommandOutcome, CommandRecord, DeviceFacts, DeviceRecord,
    MdmEnrollment, NewCommand, PushCertificateRow, Queued, TokenUpdateRecord,
};
pub use pki::{
    CaKeyRow, CertificateQuery, CertificateRecord, EnrollmentRecord, Recorded, RedeemRefusal,
    Redemption, RenewalRefusal, RequestedCertificate, SigningKeyRow,
};
pub use policy::{
    DeviceTarget, HeldToken, ItemChange, ManagedItemRow, PolicyVersionRecord, ReconcileRequest,
    TargetScope,
};
pub use schema::SchemaStatus;
pub use scim::{
    MemberChange, SCIM_SOURCE, ScimClientRecord, ScimColumn, ScimGroupRow, ScimMatch,
    ScimNarrowing, ScimUserRow, ScimUserWrite, TextMatch, Versioned,
};
pub use states::TokenSource;
pub use states::{
    AccountStatus, CertificateStatus, ChannelStatus, ChannelType, CommandStatus, EnrollmentStatus,
    ItemAction, ItemKind, PushStatus, RetirementReason, UnknownState,
};
pub use tokens::{
    AppClientRecord, DeviceStanding, IntegrationChanges, IntegrationDeletion, IntegrationRecord,
    NewAppClient, NewIntegration, NewToken, Revocation, TokenDeliveryCounts, TokenIndexRows,
    TokenRecord,
};
pub use users::{GroupRecord, MembershipRecord, OwnedDevice, UserRecord};

/// The current time, in whole seconds: the precision every stored timestamp has. SQLite keeps
/// timestamps as text, which compares correctly only when every value has the same shape.
pub fn now() -> chrono::DateTime<chrono::Utc> {
    use chrono::SubsecRound;
    chrono::Utc::now().trunc_subsecs(0)
}

/// Runs `$body` with `$pool` bound to the open pool, whichever driver it is.
macro_rules! on_pool {
    ($store:expr, |$pool:ident| $body:expr) => {
        match &$store.pool {
            $crate::store::Pool::Sqlite($pool) => $body,
            $crate::store::Pool::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// How a transaction that will write begins. SQLite's default (deferred) BEGIN reads from a
/// snapshot and upgrades to a writer at the first write; if another connection committed in
/// between, the upgrade fails at once with SQLITE_BUSY_SNAPSHOT (517) instead of waiting on the
/// busy timeout. `BEGIN IMMEDIATE` takes the write lock first, after this process's writers
/// have queued for it in memory ([`write_gate`]).
pub(crate) trait WriteTransaction: sqlx::Database {
    const BEGIN_WRITE: &'static str;

    /// Waits for this process's turn to write, where the database has one writer at a time.
    fn write_turn(
        pool: &sqlx::Pool<Self>,
    ) -> impl std::future::Future<Output = Option<tokio::sync::OwnedMutexGuard<()>>> + Send;
}

impl WriteTransaction for sqlx::Sqlite {
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";

    async fn write_turn(pool: &SqlitePool) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        Some(write_gate::enter(pool).await)
    }
}

impl WriteTransaction for sqlx::Postgres {
    const BEGIN_WRITE: &'static str = "BEGIN";

    /// PostgreSQL locks rows, not the database: writers do not queue.
    async fn write_turn(_: &PgPool) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        None
    }
}

/// A transaction that will write, holding this process's turn to write until it ends.
/// Dereferences to the connection, so statements run on `&mut *tx` as on a sqlx transaction.
pub(crate) struct WriteTx<DB: sqlx::Database> {
    tx: sqlx::Transaction<'static, DB>,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<DB: sqlx::Database> WriteTx<DB> {
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    pub(crate) async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl<DB: sqlx::Database> std::ops::Deref for WriteTx<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for WriteTx<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}

/// Opens a transaction that reads and then writes (see [`WriteTransaction`]).
pub(crate) async fn begin_write<DB: WriteTransaction>(
    pool: &sqlx::Pool<DB>,
) -> Result<WriteTx<DB>, sqlx::Error> {
    let turn = DB::write_turn(pool).await;
    let tx = pool.begin_with(DB::BEGIN_WRITE).await?;
    Ok(WriteTx { tx, _turn: turn })
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule refused the write (a name already taken, say).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
    #[error("database error: {0}")]
    Database(sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A backup could not be written (the message says why and what to do).
    #[error("backup: {0}")]
    Backup(String),
    /// The schema is not one this binary may serve (see [`SchemaStatus`]).
    #[error("database schema: {0}")]
    Schema(String),
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if is_disk_full(&err) {
            note_disk_full();
        }
        StoreError::Database(err)
    }
}

/// SQLite's SQLITE_FULL, PostgreSQL's disk_full (53100).
fn is_disk_full(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => matches!(db.code().as_deref(), Some("13" | "53100")),
        _ => false,
    }
}

/// When a write last failed because the database's disk is full (Unix milliseconds; 0 never).
static DISK_FULL_AT_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

fn note_disk_full() {
    let now = chrono::Utc::now().timestamp_millis();
    DISK_FULL_AT_MS.store(now, std::sync::atomic::Ordering::Relaxed);
    tracing::error!("the database's disk is full: writes fail until space is freed");
}

/// Whether a write failed for lack of disk space within the last `window` (the HTTP layer
/// answers 507 rather than 500 then).
pub fn disk_full_within(window: Duration) -> bool {
    let at = DISK_FULL_AT_MS.load(std::sync::atomic::Ordering::Relaxed);
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    at > 0 && chrono::Utc::now().timestamp_millis().saturating_sub(at) <= window_ms
}

impl StoreError {
    /// Maps a unique-constraint violation to [`StoreError::Conflict`] with the given message.
    fn conflict_on_unique(err: sqlx::Error, message: impl Into<String>) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::Conflict(message.into()),
            _ => Self::Database(err),
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Clone, Debug)]
pub(crate) enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Which database a [`Store`] runs on, for logs and `readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    /// Changes this node made, for the MDM caches (`generation`).
    changes: std::sync::Arc<LocalChanges>,
    /// SQLite: the background WAL checkpoint task (`wal`), stopped with the last clone.
    _checkpointer: Option<std::sync::Arc<wal::Checkpointer>>,
}

/// How long an SQLite statement waits for a lock another connection holds.
pub(super) const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How every SQLite connection is opened (WAL mode; checkpoints left to `wal`).
fn sqlite_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL is durable across application crashes in WAL mode; only an OS crash can
        // lose the last transactions, which is the usual trade for an embedded server.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        // Checkpoints run on a background task, not in the COMMIT of the request that filled
        // the log (store::wal); this is only the backstop should that task stop.
        .pragma(
            "wal_autocheckpoint",
            wal::AUTOCHECKPOINT_BACKSTOP_PAGES.to_string(),
        )
}

/// A PostgreSQL connection idle this long is pinged before it is handed out.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

impl Store {
    /// Opens (creating if needed) the SQLite database at `path` in WAL mode.
    pub async fn open_sqlite(path: &Path, max_connections: u32) -> StoreResult<Store> {
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            // sqlx pings an idle connection before handing it out; for SQLite that is one more
            // round trip to the connection's thread per acquire and proves nothing (the file
            // cannot go away like a server can).
            .test_before_acquire(false)
            .connect_with(sqlite_options(path))
            .await?;
        let checkpointer = wal::Checkpointer::start(pool.clone());
        Ok(Store {
            pool: Pool::Sqlite(pool),
            changes: Default::default(),
            _checkpointer: Some(std::sync::Arc::new(checkpointer)),
        })
    }

    /// Connects to PostgreSQL at `url` (`postgres://…`); on this host without TLS unless the
    /// URL or the environment configures it, or the server insists (`loopback_tls`).
    pub async fn open_postgres(url: &str, max_connections: u32) -> StoreResult<Store> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
        let pool_options = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            // When PostgreSQL is down, a request waits at most this long for a connection
            // before it fails (503): well inside request_timeout_secs, so nothing hangs.
            .acquire_timeout(Duration::from_secs(3))
            // A connection that sat idle may have outlived a server restart: ping it before
            // use. One in steady use has just proven itself, and pinging it anyway cost two
            // round trips per SCEP issuance.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            });
        let pool = match loopback_tls::plain_first(url, &options) {
            Some(plain) => match pool_options.clone().connect_with(plain).await {
                Err(e) if loopback_tls::refused_in_the_clear(&e) => {
                    tracing::info!("PostgreSQL refused a connection without TLS; using TLS");
                    pool_options.connect_with(options).await?
                }
                connected => connected?,
            },
            None => pool_options.connect_with(options).await?,
        };
        let store = Store {
            pool: Pool::Postgres(pool),
            changes: Default::default(),
            _checkpointer: None,
        };
        let tls = store.connection_encrypted().await?.unwrap_or_default();
        tracing::info!(tls, "connected to PostgreSQL");
        Ok(store)
    }

    /// Whether this process's connections to the database are encrypted: `None` on SQLite,
    /// else what PostgreSQL reports for the connection that asks (`pg_stat_ssl`).
    pub async fn connection_encrypted(&self) -> StoreResult<Option<bool>> {
        match &self.pool {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(pool) => {
                let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
                let (ssl,): (bool,) = sqlx::query_as(sql).fetch_one(pool).await?;
                Ok(Some(ssl))
            }
        }
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    /// Answers whether the database takes a trivial query (for `/readyz`).
    pub async fn ping(&self) -> StoreResult<()> {
        on_pool!(self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, |pool| pool.close().await)
    }
}
