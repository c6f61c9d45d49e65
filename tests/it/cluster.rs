//! Several nodes on one database: a lease goes to one node at a time and moves on when its
//! holder stops renewing it or shuts down; the reconciler's periodic pass runs under one.

use std::time::{Duration, Instant};

use crate::harness::{TestDb, TestServer};

#[tokio::test]
async fn a_lease_has_one_holder_and_moves_when_it_runs_out() {
    for db in TestDb::all().await {
        let server = TestServer::start_on(&db).await;
        let store = server.store().clone();
        let name = format!("test:{}", uuid::Uuid::new_v4().simple());
        let t = 1_000_000;
        assert!(store.try_lease(&name, "a", t, 1_000).await.unwrap());
        assert!(!store.try_lease(&name, "b", t + 10, 1_000).await.unwrap());
        // The holder renews before it runs out; the other still waits.
        assert!(store.try_lease(&name, "a", t + 500, 1_000).await.unwrap());
        assert!(!store.try_lease(&name, "b", t + 1_400, 1_000).await.unwrap());
        // a stopped renewing (it died): once its lease ran out, b takes over, and a cannot
        // take it back until b's runs out.
        assert!(store.try_lease(&name, "b", t + 1_500, 1_000).await.unwrap());
        assert!(!store.try_lease(&name, "a", t + 1_600, 1_000).await.unwrap());
        assert_eq!(store.lease(&name).await.unwrap().unwrap().holder, "b");
        // Released at shutdown: free at once.
        store.release_lease(&name, "a").await.unwrap();
        assert_eq!(store.lease(&name).await.unwrap().unwrap().holder, "b");
        store.release_lease(&name, "b").await.unwrap();
        assert!(store.lease(&name).await.unwrap().is_none());

        // Sixteen nodes ask at the same moment for a free lease: exactly one gets it.
        let fresh = format!("test:{}", uuid::Uuid::new_v4().simple());
        let mut asks = tokio::task::JoinSet::new();
        for i in 0..16 {
            let (store, fresh) = (store.clone(), fresh.clone());
            asks.spawn(async move {
                store
                    .try_lease(&fresh, &format!("node-{i}"), t, 60_000)
                    .await
                    .unwrap()
            });
        }
        let winners = asks.join_all().await.into_iter().filter(|w| *w).count();
        assert_eq!(winners, 1, "{}", db.name());
        server.stop().await;
    }
}

/// Two nodes on one PostgreSQL database: the periodic full pass is leased by one of them, and
/// the other takes it over when that node stops.
#[tokio::test]
async fn the_periodic_pass_runs_on_one_node_and_moves_when_it_stops() {
    let Some(db) = TestDb::all()
        .await
        .into_iter()
        .find(|d| d.name() == "postgres")
    else {
        return;
    };
    const CONFIG: &str = "[policy]\nfull_pass_interval_secs = 1\n";
    // Nodes of one cluster share the database and the master key.
    let keys = tempfile::tempdir().unwrap();
    let node_config = |args: &mut trustbroker::config::ConfigArgs| {
        args.database_url = db.database_url();
        args.secret_key_file = Some(keys.path().join("secret.key"));
    };
    let a = TestServer::start_configured(node_config, CONFIG).await;
    let b = TestServer::start_configured(node_config, CONFIG).await;
    let node = |s: &TestServer| s.server.as_ref().unwrap().node.as_str().to_owned();
    let (node_a, node_b) = (node(&a), node(&b));
    let store = a.store().clone();
    let holder = || async {
        store
            .lease("reconcile:full-pass")
            .await
            .unwrap()
            .map(|l| l.holder)
    };
    // Over three intervals the lease stays with the node that took it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = loop {
        if let Some(first) = holder().await {
            break first;
        }
        assert!(Instant::now() < deadline, "no node took the periodic pass");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(first == node_a || first == node_b, "{first}");
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            holder().await.as_deref(),
            Some(first.as_str()),
            "one holder while it lives"
        );
    }
    let (stopping, staying, staying_node) = if first == node_a {
        (a, b, node_b)
    } else {
        (b, a, node_a)
    };
    stopping.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = staying
            .store()
            .lease("reconcile:full-pass")
            .await
            .unwrap()
            .map(|l| l.holder);
        if now.as_deref() == Some(staying_node.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other node did not take over the pass: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    staying.stop().await;
}
