//! What the load generators share: their own connection to the broker's database (to write
//! fleets straight into it and to watch commands being queued). Included by `#[path]`.

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use trustbroker::config::Database;

/// The bench's own connection to the broker's database.
pub enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

#[macro_export]
macro_rules! on_db {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::bench_db::Db::Sqlite($pool) => $body,
            $crate::bench_db::Db::Postgres($pool) => $body,
        }
    };
}

impl Db {
    pub async fn open(database: &Database) -> anyhow::Result<Db> {
        Ok(match database {
            Database::Sqlite { path } => {
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(Duration::from_secs(30));
                Db::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(2)
                        .connect_with(options)
                        .await?,
                )
            }
            Database::Postgres { url } => Db::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(url)
                    .await?,
            ),
        })
    }

    pub async fn scalar(&self, sql: &'static str) -> anyhow::Result<i64> {
        Ok(on_db!(self, |pool| sqlx::query_scalar::<_, Option<i64>>(
            sql
        )
        .fetch_one(pool)
        .await?
        .unwrap_or(0)))
    }

    pub async fn commands_of(&self, udid: &str) -> anyhow::Result<i64> {
        let sql = "SELECT COUNT(*) FROM mdm_commands WHERE enrollment_id = $1";
        Ok(on_db!(self, |pool| sqlx::query_scalar::<_, i64>(sql)
            .bind(udid)
            .fetch_one(pool)
            .await?))
    }
}

/// `INSERT INTO <table> VALUES <rows>`: `rows` copies of `row`, where `#k` is the row's k-th of
/// `per_row` values, numbered after `shared` values bound once before all rows (`$1`…).
pub fn insert(table: &str, rows: usize, shared: usize, per_row: usize, row: &str) -> String {
    let mut sql = format!("INSERT INTO {table} VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        let mut text = row.to_owned();
        // Highest first, so that `#1` never matches the start of `#10`.
        for k in (0..per_row).rev() {
            text = text.replace(
                &format!("#{k}"),
                &format!("${}", shared + r * per_row + k + 1),
            );
        }
        sql.push_str(&text);
    }
    sql
}
