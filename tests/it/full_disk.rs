//! SQLite on a full disk: writes are refused with 507 and a message that says so, reads and
//! devices keep being answered, nothing is half-written, and once space is freed the same
//! process writes again; the database passes SQLite's integrity check and restarts.
//!
//! The data directory is a 4 MiB tmpfs of the test's own (root only; skipped elsewhere).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::StatusCode;
use serde_json::Value as Json;

use crate::device::Device;
use crate::harness::TestServer;

/// A small tmpfs, unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(SmallDisk { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a filler file until the disk is full; its path.
    fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

async fn new_challenge(server: &TestServer, admin: &str) -> (StatusCode, Json) {
    let response = server
        .client
        .post(server.url("/api/v1/scep/challenges"))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Json::Null))
}

#[tokio::test]
async fn a_full_disk_refuses_writes_clearly_and_corrupts_nothing() {
    let Some(disk) = SmallDisk::mount("4m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let dir = disk.path().to_path_buf();
    let start = |dir: PathBuf| TestServer::start_with(move |args| args.data_dir = Some(dir));
    let server = start(dir.clone()).await;
    let admin = server.admin_key("ops", &["admin"]).await;
    let device = Device::enroll(&server, &server.challenge(&admin).await).await;
    device.check_in(&server).await;

    let filler = disk.fill();
    // Writes fail once SQLite needs a page it cannot get: 507, never 500.
    let mut refused = None;
    for _ in 0..2_000 {
        let (status, body) = new_challenge(&server, &admin).await;
        match status {
            StatusCode::CREATED => continue,
            other => {
                refused = Some((other, body));
                break;
            }
        }
    }
    let (status, body) = refused.expect("a write is refused on a full disk");
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{body}");
    assert_eq!(body["error"]["code"], "disk_full", "{body}");
    // Reads are still answered, and so is the device.
    let listed = server
        .client
        .get(server.url("/api/v1/enrollments"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    let (status, _) = device
        .report(&server, "Idle", None, plist::Dictionary::new())
        .await;
    assert!(
        status == StatusCode::OK || status == StatusCode::INSUFFICIENT_STORAGE,
        "{status}"
    );

    // Space freed: the same process writes again.
    std::fs::remove_file(&filler).unwrap();
    let (status, body) = new_challenge(&server, &admin).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    server.stop().await;

    // Nothing is damaged: SQLite's own check, then a restart that serves the device.
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.join("trustbroker.db").display()
    ))
    .await
    .unwrap();
    let verdict: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(verdict, "ok");
    pool.close().await;
    let server = start(dir.clone()).await;
    device.check_in(&server).await;
    assert!(device.idle(&server).await.is_none());
    server.stop().await;
    drop(disk);
}
