//! A rolling upgrade, with the previous tagged release (deploy/previous-release, built by
//! tests/previous-release.sh) and this build side by side on one PostgreSQL database: the old
//! release serves, this build's `migrate --check` says "behind" and `migrate` expands the
//! schema under it, the old node keeps serving, a new node joins, and commands queued through
//! either are delivered through the other. The old binary then says the database is ahead of
//! it and refuses to start on it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::Device;
use crate::harness::{
    BrokerProcess, PgTestDb, TestServer, binary, binary_at, created_key, peers_required, run_binary,
};

/// The previous release's binary, when tests/run.sh built it.
fn previous_release() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("TRUSTBROKER_TEST_PREVIOUS_RELEASE")?);
    path.exists().then_some(path)
}

struct Node {
    process: BrokerProcess,
    front: TestServer,
    _data: tempfile::TempDir,
}

fn serve(cmd: std::process::Command, env: &[(&str, &str)]) -> Node {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().display().to_string();
    let process =
        BrokerProcess::serve_with(cmd, &["--data-dir", &dir, "--listen", "127.0.0.1:0"], env);
    let front = TestServer::front(process.base(), process.client());
    Node {
        process,
        front,
        _data: data,
    }
}

async fn queue(node: &TestServer, admin: &str, udid: &str) -> String {
    node.queue_device_information(admin, &[udid])
        .await
        .remove(0)
}

/// `path`'s `migrate --check`: exit code and what it said.
async fn check(cmd: std::process::Command, env: Vec<(String, String)>) -> (Option<i32>, String) {
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, stdout, stderr) = run_binary(cmd, &["migrate", "--check"], &env);
        (code, format!("{stdout}{stderr}"))
    })
    .await
    .unwrap()
}

fn version_of(path: &Path) -> String {
    let (_, stdout, _) = run_binary(binary_at(path), &["--version"], &[]);
    stdout.trim().to_owned()
}

#[tokio::test]
async fn the_previous_release_and_this_one_serve_one_database_through_a_rolling_upgrade() {
    let Some(old_binary) = previous_release() else {
        if let Ok(why) = std::env::var("TRUSTBROKER_TEST_PREVIOUS_RELEASE_MISSING") {
            eprintln!("skipped: the previous release is {why}");
            return;
        }
        assert!(
            !peers_required(),
            "TRUSTBROKER_TEST_PREVIOUS_RELEASE: tests/previous-release.sh did not build it"
        );
        return;
    };
    let Some(pg) = PgTestDb::create().await else {
        return;
    };
    let old_version = version_of(&old_binary);
    let new_version = version_of(Path::new(env!("CARGO_BIN_EXE_trustbroker")));
    assert_ne!(old_version, new_version, "two different releases");
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("secret.key").display().to_string();
    let env = [
        ("DATABASE_URL", pg.url.as_str()),
        ("TRUSTBROKER_SECRET_KEY_FILE", key_file.as_str()),
    ];
    let owned_env = || {
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
    };

    // The old release creates the database and serves a device.
    let old = serve(binary_at(&old_binary), &env);
    let (code, stdout, stderr) = run_binary(
        binary_at(&old_binary),
        &["admin-key", "create", "--name", "upgrade"],
        &env,
    );
    assert_eq!(code, Some(0), "{stderr}");
    let admin = created_key(&stdout);
    let device = Device::enroll(&old.front, &old.front.challenge(&admin).await).await;
    device.check_in(&old.front).await;
    let before = queue(&old.front, &admin, &device.udid).await;

    // This build sees a schema behind it and expands it while the old node serves.
    let (code, said) = check(binary(), owned_env()).await;
    assert_eq!(code, Some(10), "behind: {said}");
    let (code, _, stderr) = run_binary(binary(), &["migrate"], &env);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, said) = check(binary(), owned_env()).await;
    assert_eq!(code, Some(0), "equal after migrating: {said}");

    // The old node still serves on the expanded schema: the command queued before, and a
    // new enrollment.
    assert_eq!(device.acknowledge_next(&old.front).await, before);
    let second = Device::enroll(&old.front, &old.front.challenge(&admin).await).await;
    second.check_in(&old.front).await;

    // A node of this build joins; commands cross between the two releases both ways.
    let new = serve(binary(), &env);
    let from_old = queue(&old.front, &admin, &device.udid).await;
    assert_eq!(device.acknowledge_next(&new.front).await, from_old);
    let from_new = queue(&new.front, &admin, &second.udid).await;
    assert_eq!(second.acknowledge_next(&old.front).await, from_new);
    let third = Device::enroll(&new.front, &new.front.challenge(&admin).await).await;
    third.check_in(&new.front).await;
    let to_third = queue(&new.front, &admin, &third.udid).await;
    assert_eq!(third.acknowledge_next(&old.front).await, to_third);
    assert!(device.idle(&old.front).await.is_none(), "nothing twice");

    // The old binary knows the database is ahead of it and will not start on it again.
    let (code, said) = check(binary_at(&old_binary), owned_env()).await;
    assert_eq!(code, Some(11), "ahead of the old release: {said}");
    let refused = tokio::task::spawn_blocking({
        let (old_binary, env) = (old_binary.clone(), owned_env());
        move || {
            let data = tempfile::tempdir().unwrap();
            let dir = data.path().display().to_string();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            run_with_timeout(
                binary_at(&old_binary),
                &["serve", "--data-dir", &dir, "--listen", "127.0.0.1:0"],
                &env,
                Duration::from_secs(60),
            )
        }
    })
    .await
    .unwrap();
    let (code, stderr) = refused.expect("the old release refuses to start, it does not serve");
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("migration"), "says why: {stderr}");
    eprintln!(
        "rolling upgrade {old_version} -> {new_version} on PostgreSQL: migrated under a serving \
         old node; 3 commands crossed between the releases; the old binary refuses the new \
         schema: {}",
        stderr.lines().last().unwrap_or_default()
    );
    old.process.kill_hard();
    new.process.kill_hard();
}

/// Runs `cmd` with `args`; `None` if it was still running after `limit` (then killed).
fn run_with_timeout(
    mut cmd: std::process::Command,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> Option<(Option<i32>, String)> {
    let mut child = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use std::io::Read;
                let _ = pipe.read_to_string(&mut stderr);
            }
            return Some((status.code(), stderr));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
