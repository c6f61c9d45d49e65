//! What the enrollment portal asks of the database beyond the PKI tables' own queries: how
//! many profiles a person holds that no device has used yet (counted here, so the limit holds
//! across nodes), and taking back one that went over that limit.

use chrono::{DateTime, Utc};

use super::{Store, StoreResult, on_pool};

/// More rows than any sane limit: the query's work stays bounded whatever is stored.
const MAX_LISTED: i64 = 10_000;

impl Store {
    /// When each challenge issued to `user_id`'s enrollment records since `since` and not yet
    /// redeemed was created, oldest first.
    pub async fn unredeemed_profiles_since(
        &self,
        user_id: &str,
        since: DateTime<Utc>,
    ) -> StoreResult<Vec<DateTime<Utc>>> {
        let sql = "SELECT c.created_at FROM scep_challenges c \
                   JOIN enrollments e ON e.id = c.enrollment_id \
                   WHERE e.user_id = $1 AND c.redeemed_at IS NULL AND c.created_at > $2 \
                   ORDER BY c.created_at LIMIT $3";
        Ok(on_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(user_id)
            .bind(since)
            .bind(MAX_LISTED)
            .fetch_all(pool)
            .await?))
    }

    /// Deletes an enrollment record that was just created and never handed out, with its
    /// challenge, if that challenge is still unredeemed. Returns whether it was deleted.
    pub async fn discard_unredeemed_enrollment(&self, enrollment_id: &str) -> StoreResult<bool> {
        let challenge = "DELETE FROM scep_challenges \
                         WHERE enrollment_id = $1 AND redeemed_at IS NULL";
        let enrollment = "DELETE FROM enrollments WHERE id = $1";
        let deleted: Result<bool, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let challenges = sqlx::query(challenge)
                .bind(enrollment_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if challenges == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            sqlx::query(enrollment)
                .bind(enrollment_id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(true)
        }
        .await);
        Ok(deleted?)
    }
}
