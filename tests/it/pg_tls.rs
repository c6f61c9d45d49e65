//! TLS to a PostgreSQL on this host: left out when nobody asks for it, used when the URL asks,
//! and used anyway when the server accepts nothing else (`store::loopback_tls`).

use trustbroker::store::Store;

use crate::outage::PrivatePostgres;

async fn encrypted(url: &str) -> Result<bool, String> {
    let store = Store::open_postgres(url, 2)
        .await
        .map_err(|e| e.to_string())?;
    let encrypted = store
        .connection_encrypted()
        .await
        .map_err(|e| e.to_string())?;
    store.close().await;
    Ok(encrypted.expect("PostgreSQL reports TLS"))
}

#[tokio::test]
async fn postgres_on_loopback_is_reached_in_the_clear_unless_tls_is_asked_for_or_required() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let url = pg.url();
    pg.serve_tls(false);
    // The server offers TLS: the default (`prefer`) would take it; on loopback it is skipped.
    assert_eq!(encrypted(&url).await, Ok(false));
    // A mode the URL states is kept.
    assert_eq!(encrypted(&format!("{url}?sslmode=prefer")).await, Ok(true));
    assert_eq!(encrypted(&format!("{url}?sslmode=require")).await, Ok(true));

    pg.serve_tls(true);
    // Rules for `hostssl` only: the plain attempt is refused and TLS is used.
    assert_eq!(encrypted(&url).await, Ok(true));
    // Unless the operator said not to: then the refusal stands.
    let refused = encrypted(&format!("{url}?sslmode=disable")).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("no encryption")),
        "{refused:?}"
    );
}
