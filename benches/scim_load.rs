//! SCIM provisioning load, to queued commands: a 10,000-member group pushed in batches (as
//! Okta and Entra ID push it) and a 1-member PATCH, each timed until the commands the policy
//! asks for are queued on the members' devices.
//!
//!   cargo bench --bench scim_load -- --users 10000 --batch 1000 [--database-url postgres://…]
//!
//! The broker runs in this process on a fresh SQLite file (or the given empty PostgreSQL
//! database), driven over its plain-HTTP listener with a real SCIM client token:
//!
//! 1. `--users` + `--single` POST /Users at `--concurrency` (users per second); each person then
//!    gets an enrolled device, written straight into the database as `policy_load` writes its
//!    fleet (an active enrollment record, the device owned by the person, an active channel
//!    without a push token, so nothing is pushed): timed apart, not what is measured;
//! 2. a group is created over SCIM and a policy (one profile and one app, two commands per
//!    device) targeting it is applied over the admin API; then the first `--users` people are
//!    added with PATCH `add members` in batches of `--batch`: time per batch, until every
//!    reconcile request is claimed, and until all 2·N commands are queued;
//! 3. `--single` times, one more person is added with a 1-member PATCH: request time, and time
//!    until their device's two commands are queued.
//!
//! `benches/scim.sh` runs it on SQLite and PostgreSQL.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use clap::Parser;
use serde_json::{Value as Json, json};
use trustbroker::config::{Config, ConfigArgs, FileConfig};

#[path = "common/bench_db.rs"]
mod bench_db;
use bench_db::{Db, insert};

/// The broker's allocator (src/main.rs, `trustbroker::allocator`): the in-process server is
/// measured as it ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Members of the group pushed in batches (each a person with an enrolled device).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Members per PATCH when the group is pushed.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// 1-member PATCHes timed one after the other (each adds one more person).
    #[arg(long, default_value_t = 20)]
    single: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// PostgreSQL URL of an empty database; without it, SQLite in a temporary data directory.
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long, default_value = "trustbroker")]
    label: String,
    /// The broker's log filter.
    #[arg(long, default_value = "warn")]
    log: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PATCH: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const PROVIDER: &str = "okta";
const GROUP_EXTERNAL_ID: &str = "grp-everyone";
const TOPIC: &str = "com.apple.mgmt.External.bench";
/// Commands the policy queues per device: its profile and its app.
const COMMANDS_PER_DEVICE: i64 = 2;
/// Devices per multi-row INSERT.
const ROWS_PER_INSERT: usize = 500;

fn policy() -> String {
    format!(
        r#"name: everyone
description: passcode and PingID for everyone the IdP pushes
targets:
  groups:
    - {{ provider: {PROVIDER}, id: "{GROUP_EXTERNAL_ID}" }}
profiles:
  - name: passcode
    payloads:
      - {{ PayloadType: com.apple.mobiledevice.passwordpolicy, minLength: 8 }}
apps:
  - bundle_id: com.pingidentity.pingid
    itunes_store_id: 1076521545
    configuration:
      user_email: "${{user.email}}"
"#
    )
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    async fn send(&self, method: reqwest::Method, path: &str, body: Json) -> anyhow::Result<Json> {
        let response = self
            .http
            .request(method, format!("{}/scim/v2{path}", self.base))
            .bearer_auth(&self.token)
            .header("content-type", "application/scim+json")
            .body(body.to_string())
            .send()
            .await?;
        let status = response.status();
        let text = response.text().await?;
        if !status.is_success() {
            bail!("{path}: {status}: {text}");
        }
        Ok(if text.is_empty() {
            Json::Null
        } else {
            serde_json::from_str(&text)?
        })
    }
}

impl Db {
    /// Gives each person (user ID) an enrolled device: an active enrollment record, the device
    /// owned by them, an active channel without a push token. Returns the UDIDs, in order.
    async fn enroll(&self, user_ids: &[String]) -> anyhow::Result<Vec<String>> {
        let now = trustbroker::store::now();
        let udids: Vec<String> = (0..user_ids.len())
            .map(|i| format!("00008120-{i:016X}"))
            .collect();
        let rows: Vec<(&String, &String, String)> = user_ids
            .iter()
            .zip(&udids)
            .map(|(user, udid)| (user, udid, uuid::Uuid::new_v4().to_string()))
            .collect();
        on_db!(self, |pool| {
            let mut tx = pool.begin().await?;
            for chunk in rows.chunks(ROWS_PER_INSERT) {
                let n = chunk.len();
                let sql = insert(
                    "enrollments (id, for_user, requested_by, created_at, status, user_id, \
                     udid, bound_at)",
                    n,
                    1,
                    3,
                    "(#0, 'bench', 'bench', $1, 'active', #1, #2, $1)",
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
                for (user, udid, enrollment) in chunk {
                    q = q.bind(enrollment).bind(*user).bind(*udid);
                }
                q.execute(&mut *tx).await?;
                let sql = insert(
                    "mdm_devices (udid, enrollment_id, serial_number, product_name, topic, \
                     owner_id, owner_bound_at, authenticated_at, updated_at)",
                    n,
                    2,
                    3,
                    "(#0, #1, #0, 'iPhone15,2', $2, #2, $1, $1, $1)",
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now).bind(TOPIC);
                for (user, udid, enrollment) in chunk {
                    q = q.bind(*udid).bind(enrollment).bind(*user);
                }
                q.execute(&mut *tx).await?;
                let sql = insert(
                    "mdm_enrollments (id, udid, channel, push_token, push_magic, status, \
                     push_status, created_at, updated_at)",
                    n,
                    1,
                    2,
                    "(#0, #0, 'device', NULL, #1, 'active', 'unknown', $1, $1)",
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
                for (_, udid, _) in chunk {
                    q = q
                        .bind(*udid)
                        .bind(uuid::Uuid::new_v4().to_string().to_uppercase());
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        if let Db::Postgres(pool) = self {
            sqlx::query("ANALYZE users, groups, user_groups, enrollments, mdm_devices, mdm_enrollments, scim_users, scim_groups")
                .execute(pool)
                .await?;
        }
        Ok(udids)
    }
}

/// Waits until no reconcile request is left unclaimed; the time since `started`.
async fn claimed(db: &Db, started: Instant) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left = db.scalar("SELECT COUNT(*) FROM reconcile_requests").await?;
        if left == 0 {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            bail!("{left} reconcile requests still unclaimed after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until at least `target` commands are queued in all; the time since `started`.
async fn all_queued(db: &Db, target: i64, started: Instant) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(1200);
    loop {
        // MAX(seq) is one index probe; COUNT(*) is read only once it can be done.
        if db.scalar("SELECT MAX(seq) FROM mdm_commands").await? >= target
            && db.scalar("SELECT COUNT(*) FROM mdm_commands").await? >= target
        {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            let queued = db.scalar("SELECT COUNT(*) FROM mdm_commands").await?;
            bail!("{queued} of {target} commands queued after 1200 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn pick(sorted: &[Duration], q: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or_default()
}

fn main() -> anyhow::Result<()> {
    trustbroker::allocator::pad_glibc_heaps();
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    trustbroker::telemetry::init_logging(trustbroker::config::LogFormat::Human, &args.log);
    let data_dir = tempfile::tempdir()?;
    let config_args = ConfigArgs {
        data_dir: Some(data_dir.path().to_path_buf()),
        database_url: args.database_url.clone(),
        listen: Some("127.0.0.1:0".parse()?),
        http_listen: Some("127.0.0.1:0".parse()?),
        ..Default::default()
    };
    // No periodic full pass in the middle of a measurement.
    let file: FileConfig = toml::from_str("[policy]\nfull_pass_interval_secs = 86400\n")?;
    let config = Config::merge(config_args, file)?;
    let database = config.database.clone();
    let server = trustbroker::server::start(config).await?;
    let base = format!(
        "http://{}",
        server
            .http_addr
            .context("the plain HTTP listener is bound")?
    );
    let db = Db::open(&database).await?;
    let token = trustbroker::scim::auth::create(&server.store, PROVIDER, "bench", "bench")
        .await?
        .token;
    let scopes = trustbroker::admin::keys::parse_scopes(&["admin"])?;
    let admin = trustbroker::admin::keys::create(&server.store, "bench", &scopes, "bench")
        .await?
        .key;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let client = Arc::new(Client {
        http: http.clone(),
        base: base.clone(),
        token,
    });
    println!(
        "## SCIM load ({}, {})",
        args.label,
        server.store.backend().as_str()
    );

    // 1. People, then their devices.
    let people = args.users + args.single;
    let started = Instant::now();
    let mut ids: Vec<(usize, String)> = Vec::with_capacity(people);
    let mut running = tokio::task::JoinSet::new();
    for i in 0..people {
        // At most `concurrency` requests in flight.
        if running.len() >= args.concurrency.max(1)
            && let Some(done) = running.join_next().await
        {
            ids.push(done??);
        }
        let client = client.clone();
        running.spawn(async move {
            let user = client
                .send(reqwest::Method::POST, "/Users", json!({"userName": format!("user{i}@example.org"),
                    "externalId": format!("00u{i:010}"), "active": true,
                    "emails": [{"value": format!("user{i}@example.org"), "type": "work", "primary": true}]}))
                .await?;
            let id = user["id"].as_str().map(str::to_string).context("a user id")?;
            anyhow::Ok((i, id))
        });
    }
    while let Some(done) = running.join_next().await {
        ids.push(done??);
    }
    ids.sort();
    let ids: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
    let took = started.elapsed();
    println!(
        "- {people} users created in {} ({:.0}/s at concurrency {})",
        ms(took),
        people as f64 / took.as_secs_f64(),
        args.concurrency
    );
    claimed(&db, Instant::now()).await?;
    let started = Instant::now();
    let udids = db.enroll(&ids).await?;
    eprintln!(
        "{people} devices enrolled (in the database) in {}",
        ms(started.elapsed())
    );

    // 2. The group, a policy on it, then its members in batches.
    let group = client
        .send(
            reqwest::Method::POST,
            "/Groups",
            json!({"displayName": "Everyone", "externalId": GROUP_EXTERNAL_ID}),
        )
        .await?;
    let group_path = format!("/Groups/{}", group["id"].as_str().context("a group id")?);
    let files =
        json!({"everyone.yaml": base64::engine::general_purpose::STANDARD.encode(policy())});
    let applied = http
        .post(format!("{base}/api/v1/policies/apply"))
        .bearer_auth(&admin)
        .json(&json!({"files": files}))
        .send()
        .await?;
    anyhow::ensure!(
        applied.status() == reqwest::StatusCode::CREATED,
        "apply: {} {}",
        applied.status(),
        applied.text().await?
    );
    claimed(&db, Instant::now()).await?;
    let before = db.scalar("SELECT COUNT(*) FROM mdm_commands").await?;
    anyhow::ensure!(before == 0, "{before} commands queued before the push");

    let members = &ids[..args.users];
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for batch in members.chunks(args.batch.max(1)) {
        let one = Instant::now();
        let value: Vec<Json> = batch.iter().map(|id| json!({"value": id})).collect();
        client
            .send(
                reqwest::Method::PATCH,
                &group_path,
                json!({"schemas": [PATCH],
                "Operations": [{"op": "add", "path": "members", "value": value}]}),
            )
            .await?;
        slowest = slowest.max(one.elapsed());
    }
    let pushed = started.elapsed();
    let target = COMMANDS_PER_DEVICE * args.users as i64;
    let requests_claimed = claimed(&db, started).await?;
    let queued = all_queued(&db, target, started).await?;
    println!(
        "- {}-member group in PATCHes of {}: pushed in {} (slowest PATCH {}); reconcile \
         requests claimed after {}; all {target} commands queued after {} ({:.0} devices/s)",
        members.len(),
        args.batch,
        ms(pushed),
        ms(slowest),
        ms(requests_claimed),
        ms(queued),
        members.len() as f64 / queued.as_secs_f64()
    );
    claimed(&db, Instant::now()).await?;

    // 3. One member at a time.
    let mut requests = Vec::new();
    let mut queued_times = Vec::new();
    for (id, udid) in ids[args.users..].iter().zip(&udids[args.users..]) {
        let before = db.commands_of(udid).await?;
        let started = Instant::now();
        client
            .send(
                reqwest::Method::PATCH,
                &group_path,
                json!({"schemas": [PATCH],
                       "Operations": [{"op": "add", "path": "members", "value": [{"value": id}]}]}),
            )
            .await?;
        requests.push(started.elapsed());
        loop {
            if db.commands_of(udid).await? >= before + COMMANDS_PER_DEVICE {
                queued_times.push(started.elapsed());
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "{udid}: the commands were not queued within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let in_order: Vec<String> = queued_times
        .iter()
        .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
        .collect();
    eprintln!(
        "1-member PATCH to queued, in order (ms): {}",
        in_order.join(" ")
    );
    requests.sort();
    queued_times.sort();
    println!(
        "- 1-member PATCH ×{} on the {}-member group: request p50 {} p95 {}; both commands \
         queued p50 {} p95 {} (max {})",
        requests.len(),
        args.users,
        ms(pick(&requests, 0.5)),
        ms(pick(&requests, 0.95)),
        ms(pick(&queued_times, 0.5)),
        ms(pick(&queued_times, 0.95)),
        ms(queued_times.last().copied().unwrap_or_default())
    );
    server.shutdown().await;
    Ok(())
}
