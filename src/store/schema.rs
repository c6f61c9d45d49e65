//! Where the database schema stands against the migrations this binary carries: the rolling
//! upgrade contract. A newer release migrates (expand only, so the release still serving keeps
//! working); a node never starts on a schema that has migrations it does not know, because it
//! cannot tell what they changed.

use std::collections::BTreeMap;

use sqlx::migrate::Migrator;

use super::{Pool, Store, StoreError, StoreResult, on_pool};

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// The schema compared with this binary's migrations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchemaStatus {
    /// Every migration this binary knows has run, and no other.
    Equal { version: i64 },
    /// The binary is newer: these migrations have not run yet (`migrate` or `serve` runs them).
    Behind { applied: i64, pending: Vec<i64> },
    /// The database is newer: it has migrations this binary does not know. Do not serve it.
    Ahead { known: i64, unknown: Vec<i64> },
    /// A migration ran with other contents than this binary's, or failed half-way.
    Diverged { versions: Vec<i64> },
}

impl SchemaStatus {
    /// One line for a person: what the state is and what to do.
    pub fn describe(&self) -> String {
        match self {
            SchemaStatus::Equal { version } => {
                format!("equal: the database schema is at migration {version}, as this binary")
            }
            SchemaStatus::Behind { applied, pending } => format!(
                "behind: the database is at migration {applied}; this binary would run {} more \
                 ({}) with `trustbroker migrate` or at `serve`",
                pending.len(),
                join(pending)
            ),
            SchemaStatus::Ahead { known, unknown } => format!(
                "ahead: the database has migrations this binary does not know ({}; it knows up to \
                 {known}); run the newer release",
                join(unknown)
            ),
            SchemaStatus::Diverged { versions } => format!(
                "diverged: migrations {} ran with other contents than this binary's or did not \
                 finish; restore from a backup or ask for help before serving",
                join(versions)
            ),
        }
    }

    /// The exit code of `migrate --check`: 0 equal, 10 behind, 11 ahead, 12 diverged.
    pub fn exit_code(&self) -> u8 {
        match self {
            SchemaStatus::Equal { .. } => 0,
            SchemaStatus::Behind { .. } => 10,
            SchemaStatus::Ahead { .. } => 11,
            SchemaStatus::Diverged { .. } => 12,
        }
    }

    /// Whether this binary may migrate and serve the database.
    pub fn servable(&self) -> bool {
        matches!(
            self,
            SchemaStatus::Equal { .. } | SchemaStatus::Behind { .. }
        )
    }
}

fn join(versions: &[i64]) -> String {
    versions
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One row of `_sqlx_migrations`.
#[derive(sqlx::FromRow)]
struct Applied {
    version: i64,
    checksum: Vec<u8>,
    success: bool,
}

impl Store {
    fn migrator(&self) -> &'static Migrator {
        match self.pool {
            Pool::Sqlite(_) => &SQLITE,
            Pool::Postgres(_) => &POSTGRES,
        }
    }

    /// Compares the applied migrations with this binary's. A database that was never migrated
    /// is `Behind` with every migration pending.
    pub async fn schema_status(&self) -> StoreResult<SchemaStatus> {
        let applied = self.applied().await?;
        let known: BTreeMap<i64, &[u8]> = self
            .migrator()
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| (m.version, m.checksum.as_ref()))
            .collect();
        Ok(compare(&known, &applied))
    }

    /// Runs the pending migrations after checking that the schema is one this binary knows.
    /// Returns how many ran.
    pub async fn migrate(&self) -> StoreResult<usize> {
        let status = self.schema_status().await?;
        if !status.servable() {
            return Err(StoreError::Schema(status.describe()));
        }
        let pending = match &status {
            SchemaStatus::Behind { pending, .. } => pending.len(),
            _ => 0,
        };
        if pending > 0 {
            match &self.pool {
                Pool::Sqlite(pool) => SQLITE.run(pool).await?,
                Pool::Postgres(pool) => POSTGRES.run(pool).await?,
            }
        }
        Ok(pending)
    }

    async fn applied(&self) -> StoreResult<Vec<Applied>> {
        // The table exists once anything has been migrated; before that nothing has run.
        let exists_sql = match self.pool {
            Pool::Sqlite(_) => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'"
            }
            Pool::Postgres(_) => {
                "SELECT COUNT(*) FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'"
            }
        };
        let exists: i64 = on_pool!(self, |pool| sqlx::query_scalar(exists_sql)
            .fetch_one(pool)
            .await?);
        if exists == 0 {
            return Ok(Vec::new());
        }
        let sql = "SELECT version, checksum, success FROM _sqlx_migrations ORDER BY version";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_all(pool)
            .await?))
    }
}

fn compare(known: &BTreeMap<i64, &[u8]>, applied: &[Applied]) -> SchemaStatus {
    let diverged: Vec<i64> = applied
        .iter()
        .filter(|a| !a.success || known.get(&a.version).is_some_and(|c| *c != a.checksum))
        .map(|a| a.version)
        .collect();
    if !diverged.is_empty() {
        return SchemaStatus::Diverged { versions: diverged };
    }
    let unknown: Vec<i64> = applied
        .iter()
        .filter(|a| !known.contains_key(&a.version))
        .map(|a| a.version)
        .collect();
    let newest_known = known.keys().next_back().copied().unwrap_or(0);
    if !unknown.is_empty() {
        return SchemaStatus::Ahead {
            known: newest_known,
            unknown,
        };
    }
    let pending: Vec<i64> = known
        .keys()
        .filter(|v| !applied.iter().any(|a| a.version == **v))
        .copied()
        .collect();
    let newest_applied = applied.iter().map(|a| a.version).max().unwrap_or(0);
    if pending.is_empty() {
        SchemaStatus::Equal {
            version: newest_applied,
        }
    } else {
        SchemaStatus::Behind {
            applied: newest_applied,
            pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn applied(version: i64, checksum: &[u8]) -> Applied {
        Applied {
            version,
            checksum: checksum.to_vec(),
            success: true,
        }
    }

    fn known() -> BTreeMap<i64, &'static [u8]> {
        BTreeMap::from([(1, b"a".as_slice()), (2, b"b".as_slice())])
    }

    #[test]
    fn equal_behind_ahead_and_diverged() {
        let k = known();
        assert_eq!(
            compare(&k, &[applied(1, b"a"), applied(2, b"b")]),
            SchemaStatus::Equal { version: 2 }
        );
        assert_eq!(
            compare(&k, &[applied(1, b"a")]),
            SchemaStatus::Behind {
                applied: 1,
                pending: vec![2]
            }
        );
        assert_eq!(
            compare(&k, &[]),
            SchemaStatus::Behind {
                applied: 0,
                pending: vec![1, 2]
            }
        );
        let ahead = compare(&k, &[applied(1, b"a"), applied(2, b"b"), applied(3, b"c")]);
        assert_eq!(
            ahead,
            SchemaStatus::Ahead {
                known: 2,
                unknown: vec![3]
            }
        );
        assert!(!ahead.servable());
        assert_eq!(
            compare(&k, &[applied(1, b"a"), applied(2, b"x")]),
            SchemaStatus::Diverged { versions: vec![2] }
        );
        let mut failed = applied(2, b"b");
        failed.success = false;
        assert_eq!(
            compare(&k, &[applied(1, b"a"), failed]),
            SchemaStatus::Diverged { versions: vec![2] }
        );
    }
}
