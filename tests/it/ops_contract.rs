//! The operator's contract in deploy/: the Prometheus alert rules pass `promtool check rules`
//! and their unit tests, and every metric the rules and the Grafana dashboard query is one the
//! broker really exports at /metrics after doing the work that produces it.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::{Value as Json, json};
use std::time::{Duration, Instant};

use trustbroker::identity::ldap::sync;
use trustbroker::policy::{ActivePolicies, ReconcileWake};

use crate::apns::ApnsStandIn;

use crate::device::{Device, scep_request};
use crate::harness::{TestServer, peers_required};

const RULES: &str = "deploy/prometheus/trustbroker-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/trustbroker-alerts.test.yml";
const DASHBOARD: &str = "deploy/grafana/trustbroker-dashboard.json";

/// promtool from PATH (Debian's `prometheus` package; tests/peers/prometheus.sh installs it).
fn promtool() -> Option<&'static str> {
    let found = Command::new("promtool").arg("--version").output().is_ok();
    assert!(
        found || !peers_required(),
        "promtool is missing: tests/run.sh installs it (apt-get install prometheus)"
    );
    found.then_some("promtool")
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for args in [["check", "rules", RULES], ["test", "rules", RULE_TESTS]] {
        let out = Command::new(promtool)
            .args(args)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Metric names in a PromQL expression: identifiers that are not functions, keywords, label
/// names or label values (labels sit inside braces, `by (…)`/`without (…)` lists name labels).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "rate",
        "irate",
        "increase",
        "histogram_quantile",
        "time",
        "by",
        "without",
        "and",
        "or",
        "unless",
        "on",
        "ignoring",
        "le",
        "count",
        "abs",
    ];
    let mut names = BTreeSet::new();
    let mut depth_braces = 0usize;
    let mut in_string = false;
    let mut label_list = false;
    let mut word = String::new();
    let mut flush = |word: &mut String, label_context: bool| {
        if !word.is_empty()
            && !label_context
            && !word.chars().next().is_some_and(|c| c.is_ascii_digit())
            && !NOT_METRICS.contains(&word.as_str())
        {
            names.insert(word.clone());
        }
        word.clear();
    };
    let mut previous_word = String::new();
    for c in expr.chars() {
        if in_string {
            in_string = c != '"';
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            previous_word = word.clone();
        }
        flush(&mut word, depth_braces > 0 || label_list);
        match c {
            '"' => in_string = true,
            '{' => depth_braces += 1,
            '}' => depth_braces = depth_braces.saturating_sub(1),
            '(' if matches!(previous_word.as_str(), "by" | "without" | "on" | "ignoring") => {
                label_list = true
            }
            ')' => label_list = false,
            '[' => in_string = false,
            _ => {}
        }
        if c == '(' {
            previous_word.clear();
        }
    }
    flush(&mut word, depth_braces > 0 || label_list);
    // Durations inside [5m] read as words like "5m" start with a digit and are dropped above.
    names
}

fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD))
        .expect("dashboard");
    let dashboard: Json = serde_json::from_str(&text).expect("dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .expect("every target has an expr")
                .to_owned()
        })
        .collect()
}

fn rule_exprs() -> Vec<String> {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES)).expect("rules");
    // `expr:` values, single-line or folded blocks (`expr: |` then indented lines).
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((indent, rest)) = line.split_once("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                let depth = next.len() - next.trim_start().len();
                if depth <= indent.len() {
                    break;
                }
                block.push_str(next.trim());
                block.push(' ');
                lines.next();
            }
            exprs.push(block);
        } else {
            exprs.push(rest.to_owned());
        }
    }
    exprs
}

#[test]
fn the_metric_name_reader_finds_metrics_and_nothing_else() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(trustbroker_x_bucket{status=~"5..", a="b c"}[5m]))) / on (instance) up"#,
    );
    assert_eq!(
        names,
        BTreeSet::from(["trustbroker_x_bucket".to_string(), "up".to_string()])
    );
    let exprs = rule_exprs();
    assert!(exprs.len() >= 10, "{exprs:?}");
    assert!(
        exprs
            .iter()
            .any(|e| e.contains("trustbroker_mdm_command_results_total"))
    );
}

/// Names that `/metrics` exposes (samples, with histogram suffixes as written).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let apns = ApnsStandIn::start(crate::device::TOPIC).await;
    let (url, ca) = (apns.url.clone(), apns.ca_file.clone());
    let server = TestServer::start_with(move |a| {
        a.apns_url = Some(url);
        a.apns_ca_file = Some(ca);
    })
    .await;
    let admin = server.admin_key("ops", &["admin"]).await;
    let imported = server
        .client
        .put(server.url("/api/v1/push-certificate"))
        .bearer_auth(&admin)
        .json(&json!({"certificate_pem": apns.push_cert_pem, "key_pem": apns.push_key_pem}))
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), 200);

    // The work behind each panel: a device enrolls, gets a command (woken through the APNs
    // stand-in) and acknowledges it; a SCEP request with a wrong challenge is refused;
    // an app validates a token; the directory is synced.
    let device = Device::enroll(&server, &server.challenge(&admin).await).await;
    device.check_in(&server).await;
    let response = server
        .client
        .post(server.url("/api/v1/commands"))
        .bearer_auth(&admin)
        .json(&json!({"enrollment_ids": [&device.udid], "command": {"RequestType": "DeviceInformation", "Queries": ["OSVersion"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let command = device.idle(&server).await.expect("the command");
    let uuid = command["CommandUUID"].as_string().unwrap().to_owned();
    let (status, _) = device
        .report(&server, "Acknowledged", Some(&uuid), Default::default())
        .await;
    assert_eq!(status, 200);
    let stranger = tokio::task::spawn_blocking(|| {
        trustbroker::pki::scep::client::ClientIdentity::generate(2048)
    })
    .await
    .unwrap()
    .unwrap();
    let refused = scep_request(&server, &stranger, "not-a-challenge").await;
    assert!(refused.fail_info.is_some(), "{refused:?}");
    validate_a_token(&server, &admin).await;
    let sync_stop = sync_the_directory(&server).await;

    let text = server.get_text("/metrics").await;
    let exported = exported(&text);
    // `up` is Prometheus's own, per scrape target.
    let mut missing = BTreeSet::new();
    for expr in dashboard_exprs().iter().chain(rule_exprs().iter()) {
        for name in metric_names(expr) {
            if name != "up"
                && !exported.contains(&name)
                && (peers_required() || !name.contains("ldap_sync"))
            {
                missing.insert(format!("{name} (in `{expr}`)"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not exported at /metrics:\n{}",
        missing.into_iter().collect::<Vec<_>>().join("\n")
    );
    assert!(text.contains("trustbroker_database_up 1"), "{text}");
    if let Some(stop) = sync_stop {
        let _ = stop.send(true);
    }
    server.stop().await;
}

/// Runs the LDAP sync loop against slapd for a person who signed in, until its first run's
/// metrics are out; the sender stops the loop. `None` without the peer.
async fn sync_the_directory(server: &TestServer) -> Option<tokio::sync::watch::Sender<bool>> {
    let Some(ldap) = crate::ldap_sync::Sandbox::new() else {
        assert!(!peers_required(), "slapd is required");
        return None;
    };
    ldap.ldapadd(&ldap.person("opsperson"));
    let provider = ldap.provider("");
    let identity = provider
        .authenticate("opsperson", "opspersonpw")
        .await
        .unwrap();
    server
        .store()
        .record_sign_in(&identity, "sign-in")
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    sync::spawn(
        provider,
        trustbroker::cluster::Lease::new(
            server.store().clone(),
            "ldap-sync:corp",
            trustbroker::cluster::NodeId::generate(),
        ),
        server.store().clone(),
        ActivePolicies::default(),
        ReconcileWake::default(),
        Duration::from_secs(3600),
        stopped,
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while !server
        .get_text("/metrics")
        .await
        .contains("trustbroker_ldap_sync_last_success_timestamp_seconds{provider=\"corp\"}")
    {
        assert!(
            Instant::now() < deadline,
            "the LDAP sync did not finish a run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Sandbox removes its entries on drop; the loop's first run is over.
    drop(ldap);
    Some(stop)
}

async fn validate_a_token(server: &TestServer, admin: &str) {
    let call = |path: &str, body: Json| {
        server
            .client
            .post(server.url(&format!("/api/v1{path}")))
            .bearer_auth(admin)
            .json(&body)
            .send()
    };
    let created = call(
        "/token-integrations",
        json!({"name": "opsapp", "display_name": "Ops app", "bundle_id": "org.example.ops", "config_key": "OPS_TOKEN"}),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let client: Json = call(
        "/token-integrations/opsapp/clients",
        json!({"name": "ops-backend"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let answer = server
        .client
        .post(server.url("/validate/v1/tokens"))
        .basic_auth(
            client["id"].as_str().unwrap(),
            client["client_secret"].as_str(),
        )
        .json(&json!({"token": "not-a-token"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
}
