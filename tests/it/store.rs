//! Storage conformance: the same behaviour on SQLite and PostgreSQL.

use chrono::{Duration, Utc};
use trustbroker::admin::keys;
use trustbroker::admin::scope::Scope;
use trustbroker::store::{AuditQuery, NewAuditEntry, Store, StoreError};

use crate::harness::TestDb;

async fn open(db: &TestDb, dir: &tempfile::TempDir) -> Store {
    let store = match db {
        TestDb::Sqlite => Store::open_sqlite(&dir.path().join("t.db"), 4)
            .await
            .unwrap(),
        TestDb::Postgres(pg) => Store::open_postgres(&pg.url, 4).await.unwrap(),
    };
    store.migrate().await.unwrap();
    store
}

#[tokio::test]
async fn migrations_apply_once() {
    for db in TestDb::all().await {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db, &dir).await;
        assert_eq!(store.migrate().await.unwrap(), 0, "{}", db.name());
        store.ping().await.unwrap();
    }
}

#[tokio::test]
async fn admin_key_names_are_unique_among_active_keys() {
    for db in TestDb::all().await {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db, &dir).await;
        let first = keys::create(&store, "ops", &[Scope::Admin], "t")
            .await
            .unwrap();
        let err = keys::create(&store, "ops", &[Scope::Admin], "t")
            .await
            .unwrap_err();
        assert!(
            matches!(err, keys::KeyError::Store(StoreError::Conflict(_))),
            "{}: {err}",
            db.name()
        );
        assert_eq!(keys::revoke(&store, "ops").await.unwrap(), first.id);
        let second = keys::create(&store, "ops", &[Scope::AuditRead], "t")
            .await
            .unwrap();
        assert_ne!(first.id, second.id);

        // The revoked key no longer authenticates; the new one does, with its own scopes.
        assert!(matches!(
            keys::authenticate(&store, &first.key).await,
            Err(keys::AuthFailure::Revoked(_))
        ));
        let principal = keys::authenticate(&store, &second.key).await.unwrap();
        assert_eq!(principal.scopes, vec![Scope::AuditRead]);
        let listed = keys::list(&store).await.unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].revoked_at.is_none(), "active keys first");
        assert!(listed[0].last_used_at.is_some(), "use is recorded");
    }
}

#[tokio::test]
async fn concurrent_creation_of_one_name_yields_one_key() {
    for db in TestDb::all().await {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db, &dir).await;
        let attempts = (0..8).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { keys::create(&store, "race", &[Scope::Admin], "t").await })
        });
        let mut created = 0;
        for attempt in attempts {
            if attempt.await.unwrap().is_ok() {
                created += 1;
            }
        }
        assert_eq!(created, 1, "{}", db.name());
    }
}

#[tokio::test]
async fn audit_entries_filter_and_page() {
    for db in TestDb::all().await {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db, &dir).await;
        let start = Utc::now();
        for i in 0..7 {
            let entry = NewAuditEntry {
                actor: if i % 2 == 0 { "key:a" } else { "key:b" }.into(),
                action: "thing.do".into(),
                target: Some(format!("t{i}")),
                outcome: "success".into(),
                ..Default::default()
            };
            store
                .append_audit(&entry, start + Duration::seconds(i))
                .await
                .unwrap();
        }
        let query = |actor: Option<&str>, before: Option<i64>, limit: u32| AuditQuery {
            actor: actor.map(String::from),
            before,
            limit,
            ..Default::default()
        };
        let all = store.list_audit(&query(None, None, 100)).await.unwrap();
        assert_eq!(all.len(), 7);
        assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
        assert_eq!(all[0].target.as_deref(), Some("t6"));
        assert_eq!(
            all[0].at.timestamp(),
            (start + Duration::seconds(6)).timestamp()
        );
        let a_only = store
            .list_audit(&query(Some("key:a"), None, 100))
            .await
            .unwrap();
        assert_eq!(a_only.len(), 4, "{}", db.name());
        let page = store
            .list_audit(&query(None, Some(all[2].id), 2))
            .await
            .unwrap();
        let targets: Vec<_> = page.iter().map(|e| e.target.clone().unwrap()).collect();
        assert_eq!(targets, ["t3", "t2"]);
    }
}
