//! `trustbroker policy validate|plan|apply`: locally (the configured database) or against a
//! running broker (`--server URL`, admin key in TRUSTBROKER_ADMIN_KEY), so that a CI job in
//! the policy repository can plan on every pull request and apply on merge.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{Value, json};

use super::model::Diagnostic;
use super::plan::Applied;

/// Where a plan or apply runs.
pub enum Target {
    /// The database of the configuration (no server needed).
    Local(Box<crate::config::Config>),
    Remote {
        url: String,
        admin_key: String,
        /// PEM roots to trust for the server's certificate (a generated one, say).
        ca_file: Option<PathBuf>,
    },
}

/// What a run ended in, for the exit code: 0 ok, 1 refused or failed, 2 invalid files.
pub enum Outcome {
    Ok,
    Refused,
    Invalid,
}

/// Prints every diagnostic as `file:line:column: message`.
pub fn print_diagnostics(diagnostics: &[Diagnostic]) {
    for d in diagnostics {
        eprintln!("{d}");
    }
    eprintln!("{} problem(s)", diagnostics.len());
}

pub fn validate(dir: &Path) -> Outcome {
    match super::load::load_dir(dir) {
        Ok(set) => {
            println!(
                "{}: {} policies, digest {}",
                dir.display(),
                set.policies.len(),
                set.digest
            );
            Outcome::Ok
        }
        Err(diagnostics) => {
            print_diagnostics(&diagnostics);
            Outcome::Invalid
        }
    }
}

/// Plans (or, with `apply`, applies) the directory's set and prints the plan.
pub async fn run(
    target: Target,
    dir: &Path,
    apply: Option<ApplyOptions>,
    as_json: bool,
) -> anyhow::Result<Outcome> {
    let files = match super::load::read_dir_files(dir) {
        Ok(files) => files,
        Err(diagnostics) => {
            print_diagnostics(&diagnostics);
            return Ok(Outcome::Invalid);
        }
    };
    match target {
        Target::Local(config) => run_local(&config, &files, apply, as_json).await,
        Target::Remote {
            url,
            admin_key,
            ca_file,
        } => run_remote(&url, &admin_key, ca_file.as_deref(), &files, apply, as_json).await,
    }
}

pub struct ApplyOptions {
    pub allow_destructive: bool,
    pub git_commit: Option<String>,
}

async fn run_local(
    config: &crate::config::Config,
    files: &BTreeMap<String, Vec<u8>>,
    apply: Option<ApplyOptions>,
    as_json: bool,
) -> anyhow::Result<Outcome> {
    let (store, reconciler) = crate::server::offline_reconciler(config).await?;
    let outcome = match apply {
        None => {
            let set = match super::load::load_files(files) {
                Ok(set) => set,
                Err(diagnostics) => {
                    print_diagnostics(&diagnostics);
                    return Ok(Outcome::Invalid);
                }
            };
            let plan = super::plan::plan(&store, &reconciler, &set).await?;
            print_plan(&json!(plan), as_json);
            Outcome::Ok
        }
        Some(options) => {
            let actor = crate::audit::cli_actor();
            let applied = super::plan::apply(
                &store,
                &reconciler,
                files,
                &actor,
                options.git_commit.as_deref(),
                options.allow_destructive,
            )
            .await;
            match applied {
                Ok(applied) => {
                    audit_cli_apply(&store, &applied, &options).await;
                    print_applied(&json!(applied), as_json);
                    Outcome::Ok
                }
                Err(super::plan::ApplyError::Invalid(diagnostics)) => {
                    print_diagnostics(&diagnostics);
                    Outcome::Invalid
                }
                Err(super::plan::ApplyError::Destructive(plan)) => {
                    print_plan(&json!(plan), as_json);
                    eprintln!("{}", REFUSED);
                    Outcome::Refused
                }
                Err(super::plan::ApplyError::Reconcile(e)) => return Err(e.into()),
            }
        }
    };
    store.close().await;
    Ok(outcome)
}

const REFUSED: &str = "refused: the plan locks or wipes devices; review it and run again with \
                       --allow-destructive to consent";

async fn audit_cli_apply(store: &crate::store::Store, applied: &Applied, options: &ApplyOptions) {
    if applied.unchanged {
        return;
    }
    let detail = json!({"digest": applied.plan.digest, "git_commit": options.git_commit,
                        "totals": applied.plan.totals, "destructive": applied.plan.destructive});
    let entry = crate::store::NewAuditEntry {
        actor: crate::audit::cli_actor(),
        action: "policy.apply".into(),
        target: Some(format!("v{}", applied.version)),
        outcome: crate::audit::OUTCOME_SUCCESS.into(),
        detail: Some(detail.to_string()),
        source: Some("cli".into()),
        request_id: None,
    };
    crate::audit::record(store, entry).await;
}

async fn run_remote(
    url: &str,
    admin_key: &str,
    ca_file: Option<&Path>,
    files: &BTreeMap<String, Vec<u8>>,
    apply: Option<ApplyOptions>,
    as_json: bool,
) -> anyhow::Result<Outcome> {
    let mut client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(300));
    if let Some(path) = ca_file {
        let pem =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
            client = client.add_root_certificate(cert);
        }
    }
    let client = client.build()?;
    let encoded: BTreeMap<&String, String> = files
        .iter()
        .map(|(path, bytes)| {
            (
                path,
                base64::engine::general_purpose::STANDARD.encode(bytes),
            )
        })
        .collect();
    let (endpoint, body) = match &apply {
        None => ("plan", json!({"files": encoded})),
        Some(options) => (
            "apply",
            json!({"files": encoded, "git_commit": options.git_commit,
                   "allow_destructive": options.allow_destructive}),
        ),
    };
    let response = client
        .post(format!(
            "{}/api/v1/policies/{endpoint}",
            url.trim_end_matches('/')
        ))
        .bearer_auth(admin_key)
        .json(&body)
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    match status.as_u16() {
        200 | 201 if apply.is_some() => {
            print_applied(&answer, as_json);
            Ok(Outcome::Ok)
        }
        200 => {
            print_plan(&answer, as_json);
            Ok(Outcome::Ok)
        }
        409 => {
            print_plan(answer.get("plan").unwrap_or(&Value::Null), as_json);
            eprintln!("{REFUSED}");
            Ok(Outcome::Refused)
        }
        422 if answer.get("diagnostics").is_some() => {
            let diagnostics: Vec<Diagnostic> = answer
                .get("diagnostics")
                .cloned()
                .and_then(|list| serde_json::from_value(list).ok())
                .unwrap_or_default();
            print_diagnostics(&diagnostics);
            Ok(Outcome::Invalid)
        }
        _ => anyhow::bail!(
            "{url} answered {status}: {}",
            answer
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
        ),
    }
}

fn print_applied(applied: &Value, as_json: bool) {
    if as_json {
        println!("{applied:#}");
        return;
    }
    print_plan(&applied["plan"], false);
    if applied["unchanged"].as_bool() == Some(true) {
        println!(
            "\nno change: the set is the one in force (version {})",
            applied["version"]
        );
    } else {
        println!("\napplied as version {}", applied["version"]);
    }
}

/// The plan as a person reads it: per policy, scope changes and commands; destructive actions
/// apart; totals.
fn print_plan(plan: &Value, as_json: bool) {
    if as_json {
        println!("{plan:#}");
        return;
    }
    print!("{}", render_plan(plan));
}

pub fn render_plan(plan: &Value) -> String {
    let mut out = String::new();
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let _ = writeln!(
        out,
        "plan against version {} over {} device(s) ({} not checked in yet){}",
        plan["current_version"],
        n(&plan["devices"]),
        n(&plan["devices_not_checked_in"]),
        if plan["unchanged"].as_bool() == Some(true) {
            ": no change"
        } else {
            ""
        }
    );
    for policy in plan["policies"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\n  {} ({}, {})\n    devices in scope {}  entering {}  leaving {}",
            policy["name"].as_str().unwrap_or("?"),
            policy["status"].as_str().unwrap_or("?"),
            policy["file"].as_str().unwrap_or("?"),
            n(&policy["devices_in_scope"]),
            n(&policy["entering"]),
            n(&policy["leaving"]),
        );
        let commands = command_lines(&policy["commands"]);
        if !commands.is_empty() {
            let _ = writeln!(out, "    {commands}");
        }
    }
    if let Some(destructive) = plan["destructive"].as_array().filter(|d| !d.is_empty()) {
        let _ = writeln!(out, "\n  DESTRUCTIVE");
        for d in destructive {
            let _ = writeln!(
                out,
                "    {} {} after {}s: {} device(s) now{}",
                d["policy"].as_str().unwrap_or("?"),
                d["action"].as_str().unwrap_or("?"),
                n(&d["after_secs"]),
                n(&d["devices"]),
                if d["armed"].as_bool() == Some(true) {
                    "; armed for every future leaver"
                } else {
                    ""
                }
            );
        }
    }
    let totals = command_lines(&plan["totals"]);
    let _ = writeln!(
        out,
        "\n  total: {}",
        if totals.is_empty() {
            "no commands".to_owned()
        } else {
            totals
        }
    );
    out
}

fn command_lines(counts: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(map) = counts.as_object() {
        for (name, count) in map {
            let count = count.as_u64().unwrap_or(0);
            if count > 0 {
                parts.push(format!("{} {count}", name.replace('_', " ")));
            }
        }
    }
    parts.join(", ")
}
