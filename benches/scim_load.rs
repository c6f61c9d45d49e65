//! SCIM provisioning load: how long a 10,000-member group takes to arrive in batches (as Okta
//! and Entra ID push it) and to be applied, and a 1-member PATCH.
//!
//!   cargo bench --bench scim_load -- --users 10000 --batch 1000 [--database-url postgres://…]
//!
//! The broker runs in this process on a fresh SQLite file (or the given empty PostgreSQL
//! database). Measured over its plain-HTTP listener with a real SCIM client token:
//!
//! 1. `--users` POST /Users at `--concurrency` (users per second);
//! 2. one group, then PATCH `add members` in batches of `--batch`: time per batch, in all, and
//!    until the reconciler has claimed every reconcile request the batches recorded ("applied");
//! 3. `--single` times: a 1-member PATCH (remove, then add back): request time and applied time.
//!
//! No devices are enrolled: the reconciler's side (requests to queued commands per device) is
//! what `policy_load` measures; here it is the SCIM write path up to the reconciler's queue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value as Json, json};
use trustbroker::config::{Config, ConfigArgs, Database, FileConfig};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Members per PATCH when the group is pushed.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// 1-member PATCHes timed one after the other.
    #[arg(long, default_value_t = 20)]
    single: usize,
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// PostgreSQL URL of an empty database; without it, SQLite in a temporary data directory.
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long, default_value = "trustbroker")]
    label: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const PATCH: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

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

/// Waits until no reconcile request is left unclaimed; the time it took.
async fn applied(pool: &Db, started: Instant) -> anyhow::Result<Duration> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let left: i64 = match pool {
            Db::Sqlite(p) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM reconcile_requests")
                    .fetch_one(p)
                    .await?
            }
            Db::Postgres(p) => {
                sqlx::query_scalar("SELECT COUNT(*) FROM reconcile_requests")
                    .fetch_one(p)
                    .await?
            }
        };
        if left == 0 {
            return Ok(started.elapsed());
        }
        if Instant::now() > deadline {
            bail!("{left} reconcile requests still unclaimed after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let data_dir = tempfile::tempdir()?;
    let config_args = ConfigArgs {
        data_dir: Some(data_dir.path().to_path_buf()),
        database_url: args.database_url.clone(),
        listen: Some("127.0.0.1:0".parse()?),
        http_listen: Some("127.0.0.1:0".parse()?),
        ..Default::default()
    };
    let config = Config::merge(config_args, FileConfig::default())?;
    let database = config.database.clone();
    let server = trustbroker::server::start(config).await?;
    let base = format!(
        "http://{}",
        server
            .http_addr
            .context("the plain HTTP listener is bound")?
    );
    let db = match database {
        Database::Sqlite { path } => {
            Db::Sqlite(sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display())).await?)
        }
        Database::Postgres { url } => Db::Postgres(sqlx::PgPool::connect(&url).await?),
    };
    let token = trustbroker::scim::auth::create(&server.store, "okta", "bench", "bench")
        .await?
        .token;
    let client = Arc::new(Client {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?,
        base,
        token,
    });
    println!(
        "## SCIM load ({}, {})",
        args.label,
        server.store.backend().as_str()
    );

    // 1. People.
    let started = Instant::now();
    let mut ids = Vec::with_capacity(args.users);
    let mut running = tokio::task::JoinSet::new();
    for i in 0..args.users {
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
            user["id"].as_str().map(str::to_string).context("a user id")
        });
    }
    while let Some(done) = running.join_next().await {
        ids.push(done??);
    }
    let took = started.elapsed();
    println!(
        "- {} users created in {} ({:.0}/s at concurrency {})",
        args.users,
        ms(took),
        args.users as f64 / took.as_secs_f64(),
        args.concurrency
    );
    applied(&db, Instant::now()).await?;

    // 2. The group, in batches.
    let group = client
        .send(
            reqwest::Method::POST,
            "/Groups",
            json!({"displayName": "Everyone", "externalId": "grp-everyone"}),
        )
        .await?;
    let group_path = format!("/Groups/{}", group["id"].as_str().context("a group id")?);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for batch in ids.chunks(args.batch.max(1)) {
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
    let done = applied(&db, started).await?;
    println!(
        "- {}-member group in batches of {}: pushed in {} (slowest batch {}), applied (every reconcile request claimed) after {}",
        ids.len(),
        args.batch,
        ms(pushed),
        ms(slowest),
        ms(done)
    );

    // 3. One member at a time.
    let mut requests = Vec::new();
    let mut applies = Vec::new();
    for (n, id) in ids.iter().take(args.single).enumerate() {
        let op = if n % 2 == 0 { "remove" } else { "add" };
        for op in [op, if op == "remove" { "add" } else { "remove" }] {
            let started = Instant::now();
            let operation = if op == "remove" {
                json!({"op": "remove", "path": format!("members[value eq \"{id}\"]")})
            } else {
                json!({"op": "add", "path": "members", "value": [{"value": id}]})
            };
            client
                .send(
                    reqwest::Method::PATCH,
                    &group_path,
                    json!({"schemas": [PATCH], "Operations": [operation]}),
                )
                .await?;
            requests.push(started.elapsed());
            applies.push(applied(&db, started).await?);
        }
    }
    requests.sort();
    applies.sort();
    let pick = |v: &[Duration], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    println!(
        "- 1-member PATCH ×{} on the {}-member group: request p50 {} p95 {}; applied p50 {} p95 {}",
        requests.len(),
        ids.len(),
        ms(pick(&requests, 0.5)),
        ms(pick(&requests, 0.95)),
        ms(pick(&applies, 0.5)),
        ms(pick(&applies, 0.95))
    );
    server.shutdown().await;
    Ok(())
}
