//! Backups and schema checks from the operator's side: `trustbroker backup` copies a serving
//! SQLite database, a restore brings the fleet back (devices keep checking in and get what was
//! queued before the copy), a copy without its master key does not serve, and
//! `migrate --check` tells where a schema stands.

use std::path::Path;

use crate::device::{Device, uuid_and_type};
use crate::harness::{TestServer, run_cli};

fn data_dir_env(dir: &Path) -> [(&'static str, String); 1] {
    [("TRUSTBROKER_DATA_DIR", dir.display().to_string())]
}

async fn cli(args: Vec<String>, dir: &Path) -> (bool, String, String) {
    let env = data_dir_env(dir);
    // Synchronous child process beside an in-process server: off the test's runtime thread.
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        run_cli(&args, &env)
    })
    .await
    .unwrap()
}

async fn start_in(dir: &Path) -> TestServer {
    let dir = dir.to_path_buf();
    TestServer::start_with(move |args| args.data_dir = Some(dir)).await
}

async fn enqueue_device_information(server: &TestServer, admin: &str, udid: &str) -> String {
    server
        .queue_device_information(admin, &[udid])
        .await
        .remove(0)
}

#[tokio::test]
async fn a_backup_of_a_serving_database_restores_a_fleet_that_keeps_checking_in() {
    let original = tempfile::tempdir().unwrap();
    let server = start_in(original.path()).await;
    let admin = server.admin_key("ops", &["admin"]).await;
    let device = Device::enroll(&server, &server.challenge(&admin).await).await;
    device.check_in(&server).await;
    let queued = enqueue_device_information(&server, &admin, &device.udid).await;

    // Backed up while the server serves, then more work that the copy must not contain.
    let backup = original.path().join("nightly.db");
    let (ok, stdout, stderr) = cli(
        vec!["backup".into(), backup.display().to_string()],
        original.path(),
    )
    .await;
    assert!(ok, "backup failed: {stdout} {stderr}");
    assert!(stdout.contains("backed up"), "{stdout}");
    assert!(
        stderr.contains("master key"),
        "the backup must say the key is not in it: {stderr}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the copy is private to its owner");
    }
    let after = enqueue_device_information(&server, &admin, &device.udid).await;
    // A second backup to the same file is refused and leaves the first alone.
    let size = std::fs::metadata(&backup).unwrap().len();
    let (ok, _, stderr) = cli(
        vec!["backup".into(), backup.display().to_string()],
        original.path(),
    )
    .await;
    assert!(!ok && stderr.contains("already exists"), "{stderr}");
    assert_eq!(std::fs::metadata(&backup).unwrap().len(), size);
    server.stop().await;

    // Restore: the copy as the database of a new data directory, with the master key.
    let restored = tempfile::tempdir().unwrap();
    std::fs::copy(&backup, restored.path().join("trustbroker.db")).unwrap();
    std::fs::copy(
        original.path().join("secret.key"),
        restored.path().join("secret.key"),
    )
    .unwrap();
    let server = start_in(restored.path()).await;
    device.check_in(&server).await;
    let command = device
        .idle(&server)
        .await
        .expect("the command queued before the backup");
    let (uuid, request_type) = uuid_and_type(&command);
    assert_eq!(
        (uuid.as_str(), request_type.as_str()),
        (queued.as_str(), "DeviceInformation")
    );
    let history = server
        .get_json(
            &format!("/api/v1/enrollments/{}/commands", device.udid),
            Some(&admin),
        )
        .await;
    let uuids: Vec<&str> = history["commands"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["command_uuid"].as_str())
        .collect();
    assert!(
        !uuids.contains(&after.as_str()),
        "the copy is a snapshot from before the later command: {history}"
    );
    server.stop().await;

    // Without the master key the sealed CA key cannot be opened: no start.
    let keyless = tempfile::tempdir().unwrap();
    std::fs::copy(&backup, keyless.path().join("trustbroker.db")).unwrap();
    let (ok, stdout, stderr) = cli(vec!["ca".into(), "show".into()], keyless.path()).await;
    assert!(
        !ok && stderr.contains("does not open with this master key"),
        "a copy without its key must not open: {stdout} {stderr}"
    );
}

#[tokio::test]
async fn migrate_check_says_behind_equal_or_ahead_and_serve_refuses_an_unknown_schema() {
    let dir = tempfile::tempdir().unwrap();
    let check = || cli(vec!["migrate".into(), "--check".into()], dir.path());
    let (ok, stdout, _) = check().await;
    assert!(!ok && stdout.starts_with("behind"), "{stdout}");
    assert!(
        !dir.path().join("trustbroker.db").exists(),
        "a check creates nothing"
    );
    let (ok, _, stderr) = cli(vec!["migrate".into()], dir.path()).await;
    assert!(ok, "{stderr}");
    let (ok, stdout, _) = check().await;
    assert!(ok && stdout.starts_with("equal"), "{stdout}");

    // A newer release migrated this database: this binary must not serve it.
    let store = trustbroker::store::Store::open_sqlite(&dir.path().join("trustbroker.db"), 1)
        .await
        .unwrap();
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("trustbroker.db").display()
    ))
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time) \
         VALUES (99999, 'from the future', CURRENT_TIMESTAMP, TRUE, X'00', 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let status = store.schema_status().await.unwrap();
    assert!(!status.servable(), "{status:?}");
    store.close().await;
    let (ok, stdout, _) = check().await;
    assert!(!ok && stdout.starts_with("ahead"), "{stdout}");
    let (ok, _, stderr) = cli(vec!["serve".into()], dir.path()).await;
    assert!(
        !ok && stderr.contains("does not know"),
        "serve refuses an unknown schema: {stderr}"
    );
}
