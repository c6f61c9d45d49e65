//! The admin console at `/admin`: admins sign in through the test OpenID provider with the
//! portal's provider code, get scopes from their groups (`[admin.groups]`), and read and act on
//! a device the simulator enrolled. Also its guards: scopes checked on the server whatever the
//! page shows, CSRF tokens, idle and absolute session ends, and audit records in the admin's
//! name.

use plist::{Dictionary, Value};
use reqwest::StatusCode;
use reqwest::header::SET_COOKIE;
use serde_json::Value as Json;

use crate::device::{self, Device, uuid_and_type};
use crate::harness::{TestDb, TestServer, peer_env};
use crate::portal::{
    Browser, PUBLIC_URL, hidden_input, location, oidc_toml, sign_in_at_op, to_server,
};
use crate::profiles::{import_push, push_certificate};
use trustbroker::console::session::{AdminSession, seal};

/// alice is in `admins` (everything); bob and carol in `mdm-users` (the help desk: read and
/// lock); nobody's `staff` group grants anything.
const GROUPS: &str =
    "[admin.groups]\nadmins = [\"*\"]\n\"mdm-users\" = [\"devices:read\", \"devices:lock\"]\n";

const KEY_HEX: &str = "6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b6b";

pub struct Console {
    pub server: TestServer,
    /// An admin API key holding every scope (to enroll devices and read back).
    pub admin: String,
    key: trustbroker::secrets::MasterKey,
    _key_dir: tempfile::TempDir,
}

impl Console {
    /// A server on `db` with the OIDC provider (when `issuer` is given), the console's groups,
    /// a known master key and a push certificate.
    pub async fn start(db: &TestDb, issuer: Option<&str>, extra: &str) -> Console {
        let key_dir = tempfile::tempdir().unwrap();
        let key_file = key_dir.path().join("secret.key");
        std::fs::write(&key_file, KEY_HEX).unwrap();
        let url = db.database_url();
        let idp = issuer.map(|i| oidc_toml(i, "")).unwrap_or_default();
        let server = TestServer::start_configured(
            move |args| {
                args.database_url = url;
                args.public_url = Some(PUBLIC_URL.into());
                args.secret_key_file = Some(key_file);
            },
            &format!("{idp}{extra}"),
        )
        .await;
        let admin = server.admin_key("console-test", &["admin"]).await;
        let (cert, key) = push_certificate(device::TOPIC);
        assert_eq!(
            import_push(&server, &admin, &cert, &key).await.status(),
            StatusCode::OK
        );
        Console {
            server,
            admin,
            key: trustbroker::secrets::MasterKey::parse(KEY_HEX).unwrap(),
            _key_dir: key_dir,
        }
    }

    /// A device enrolled by the simulator, checked in (Authenticate, TokenUpdate).
    pub async fn device(&self) -> Device {
        let challenge = self.server.challenge(&self.admin).await;
        let device = Device::enroll(&self.server, &challenge).await;
        device.check_in(&self.server).await;
        device
    }

    /// A browser holding a console session sealed here (not through a provider).
    pub fn browser_with(&self, session: &AdminSession) -> Browser {
        let mut browser = Browser::new(&self.server);
        browser.set_cookie("tb_admin", &seal(&self.key, session));
        browser
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    pub async fn audit(&self, query: &str) -> Vec<Json> {
        let body = self
            .server
            .get_json(&format!("/api/v1/audit?{query}"), Some(&self.admin))
            .await;
        body["entries"].as_array().unwrap().clone()
    }

    pub async fn commands_of(&self, udid: &str) -> Vec<Json> {
        let body = self
            .server
            .get_json(
                &format!("/api/v1/enrollments/{udid}/commands"),
                Some(&self.admin),
            )
            .await;
        body["commands"].as_array().unwrap().clone()
    }
}

/// A session as a sign-in would make it, with deadlines `idle` and `max` seconds from now.
pub fn session(grants: &[&str], idle: i64, max: i64) -> AdminSession {
    let now = chrono::Utc::now().timestamp();
    AdminSession {
        provider: "test".into(),
        subject: "dana".into(),
        name: "Dana".into(),
        grants: grants.iter().map(|g| g.to_string()).collect(),
        csrf: trustbroker::enroll::session::random_token(),
        idle_until: now + idle,
        expires_at: now + max,
    }
}

/// Signs `user` in at the console through the test OP; returns the page `/admin` answers.
pub async fn sign_in(console: &Console, browser: &mut Browser, user: &str, pw: &str) -> String {
    let page = browser.page(&console.url("/admin")).await;
    assert!(page.contains("Sign in to the admin console"), "{page}");
    let href = "/auth/oidc/oidc/login?for=admin";
    assert!(page.contains(href), "{page}");
    let login = browser.get(&console.url(href)).await;
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let back = sign_in_at_op(browser, &location(&login), user, pw).await;
    let done = browser.get(&to_server(&console.server, &back)).await;
    if done.status() != StatusCode::SEE_OTHER {
        return done.text().await.unwrap();
    }
    assert_eq!(location(&done), "/admin");
    let cookie = done
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("tb_admin="))
        .expect("a console session cookie");
    // Plain http (the test OP's registered URL): no `__Host-` prefix and no Secure, as in the
    // portal; on HTTPS both (see `cookies_carry_the_host_prefix_on_https_and_plain_names_on_http`).
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(cookie.contains("Max-Age=900"), "{cookie}");
    browser.page(&console.url("/admin")).await
}

fn query_responses() -> Dictionary {
    let mut responses = Dictionary::new();
    responses.insert("OSVersion".into(), "14.7".into());
    responses.insert("DeviceName".into(), "Simulated Mac".into());
    responses.insert("SerialNumber".into(), "C02SIMULATED".into());
    responses.insert("BatteryLevel".into(), Value::Real(0.5));
    let mut extra = Dictionary::new();
    extra.insert("QueryResponses".into(), Value::Dictionary(responses));
    extra
}

fn device_path(udid: &str) -> String {
    format!("/admin/devices/{udid}")
}

#[tokio::test]
async fn an_admin_signs_in_with_sso_and_queues_device_information() {
    let Some(issuer) = peer_env("TRUSTBROKER_TEST_OIDC_ISSUER") else {
        return;
    };
    for db in TestDb::all().await {
        let console = Console::start(&db, Some(&issuer), GROUPS).await;
        let device = console.device().await;
        let mut browser = Browser::new(&console.server);
        let overview = sign_in(&console, &mut browser, "alice", "alicepw").await;
        assert!(overview.contains("<h1>Overview</h1>"), "{overview}");
        assert!(overview.contains("Alice Anderson"), "{overview}");
        assert!(overview.contains("href=\"/admin/audit\""), "{overview}");
        assert!(overview.contains("Devices: 1"), "{overview}");
        assert!(overview.contains("<svg"), "a chart: {overview}");
        // The admin is recorded as a person, with their groups, as a portal sign-in would.
        let people = browser.page(&console.url("/admin/people?q=alice")).await;
        assert!(people.contains("Alice Anderson"), "{people}");
        let signed_in = console.audit("action=console.sign-in").await;
        assert!(
            signed_in
                .iter()
                .any(|e| e["outcome"] == "success" && e["target"].is_string()),
            "the person's id as the target: {signed_in:?}"
        );

        // Found by the search, by name and by owner-less status filter.
        let list = browser
            .page(&console.url("/admin/devices?q=simulated&status=active"))
            .await;
        assert!(list.contains(&device_path(&device.udid)), "{list}");
        let none = browser
            .page(&console.url("/admin/devices?q=nothing-like-it"))
            .await;
        assert!(!none.contains(&device_path(&device.udid)), "{none}");

        let page = browser.page(&console.url(&device_path(&device.udid))).await;
        assert!(page.contains("<h1>Simulated Mac</h1>"), "{page}");
        assert!(page.contains("id=\"wipe\"") && page.contains("id=\"queue-information\""));
        let csrf = hidden_input(&page, "csrf");
        let queued = browser
            .post_form(
                &console.url(&format!("{}/actions", device_path(&device.udid))),
                &[("csrf", &csrf), ("action", "information")],
            )
            .await;
        assert_eq!(queued.status(), StatusCode::SEE_OTHER);
        let page = browser.page(&console.url(&location(&queued))).await;
        assert!(page.contains("Command queued"), "{page}");
        let live = browser
            .get(&console.url(&format!("{}/live", device_path(&device.udid))))
            .await;
        assert_eq!(live.status(), StatusCode::OK);
        let live: Json = live.json().await.unwrap();
        assert_eq!(live["commands"][0]["status"], "queued", "{live}");

        // The device asks for work, gets it, and answers.
        let command = device.idle(&console.server).await.expect("a command");
        let (uuid, kind) = uuid_and_type(&command);
        assert_eq!(kind, "DeviceInformation");
        assert_eq!(live["commands"][0]["uuid"], uuid.as_str());
        let (status, _) = device
            .report(
                &console.server,
                "Acknowledged",
                Some(&uuid),
                query_responses(),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let live: Json = browser
            .get(&console.url(&format!("{}/live", device_path(&device.udid))))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(live["commands"][0]["status"], "acknowledged", "{live}");
        let page = browser.page(&console.url(&device_path(&device.udid))).await;
        assert!(page.contains("status acknowledged"), "{page}");
        assert!(page.contains("BatteryLevel"), "the inventory: {page}");

        // Re-sent: a fresh copy with a new UUID, linked to the first in the audit record.
        let resent = browser
            .post_form(
                &console.url(&format!("/admin/commands/{uuid}/resend")),
                &[("csrf", &csrf)],
            )
            .await;
        assert_eq!(resent.status(), StatusCode::SEE_OTHER);
        let commands = console.commands_of(&device.udid).await;
        assert_eq!(commands.len(), 2, "{commands:?}");
        let again = device.idle(&console.server).await.expect("the copy");
        let (copy, kind) = uuid_and_type(&again);
        assert_eq!(kind, "DeviceInformation");
        assert_ne!(copy, uuid);
        device
            .report(
                &console.server,
                "Acknowledged",
                Some(&copy),
                query_responses(),
            )
            .await;

        // Audited in alice's name, like an API key's action.
        let entries = console
            .audit("actor=admin:oidc:alice&action=command.enqueue")
            .await;
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert!(entries.iter().all(|e| e["outcome"] == "success"));
        assert_eq!(entries[1]["target"], "DeviceInformation");
        let detail: Json = serde_json::from_str(entries[1]["detail"].as_str().unwrap()).unwrap();
        assert_eq!(detail["commands"][0]["command_uuid"], uuid.as_str());
        let detail: Json = serde_json::from_str(entries[0]["detail"].as_str().unwrap()).unwrap();
        assert_eq!(detail["resent_from"], uuid.as_str());
        assert_eq!(detail["commands"][0]["command_uuid"], copy.as_str());
        let signed_in = console
            .audit("actor=admin:oidc:alice&action=console.sign-in")
            .await;
        assert_eq!(signed_in[0]["outcome"], "success");
        assert_eq!(
            console.commands_of(&device.udid).await[0]["created_by"],
            "admin:oidc:alice"
        );

        // And found in the console's own audit search.
        let audit = browser
            .page(&console.url("/admin/audit?actor=admin%3Aoidc%3Aalice&action=command."))
            .await;
        assert!(audit.contains("command.enqueue"), "{audit}");
        assert!(!audit.contains("console.sign-in"), "{audit}");
        // A time range (both databases compare timestamps).
        let since = browser
            .page(
                &console
                    .url("/admin/audit?action=command.&since=2000-01-01&until=2999-01-01T00:00"),
            )
            .await;
        assert!(since.contains("command.enqueue"), "{since}");
        let future = browser
            .page(&console.url("/admin/audit?action=command.&since=2999-01-01"))
            .await;
        assert!(!future.contains("command.enqueue"), "{future}");
        let bad = browser
            .get(&console.url("/admin/audit?since=yesterday"))
            .await;
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

        // Signing out ends the session.
        let out = browser
            .post_form(&console.url("/admin/sign-out"), &[("csrf", &csrf)])
            .await;
        assert_eq!(out.status(), StatusCode::SEE_OTHER);
        assert!(browser.cookie("tb_admin").is_none());
        let page = browser.page(&console.url("/admin")).await;
        assert!(page.contains("Sign in to the admin console"), "{page}");
    }
}

#[tokio::test]
async fn a_help_desk_admin_cannot_wipe_and_a_forged_wipe_is_refused_and_audited() {
    let Some(issuer) = peer_env("TRUSTBROKER_TEST_OIDC_ISSUER") else {
        return;
    };
    let console = Console::start(&TestDb::Sqlite, Some(&issuer), GROUPS).await;
    let device = console.device().await;
    let mut browser = Browser::new(&console.server);
    let overview = sign_in(&console, &mut browser, "bob", "bobpw").await;
    assert!(overview.contains("Bob Brown"), "{overview}");
    assert!(
        !overview.contains("href=\"/admin/audit\""),
        "no audit:read: {overview}"
    );
    let page = browser.page(&console.url(&device_path(&device.udid))).await;
    assert!(page.contains("id=\"lock\""), "{page}");
    assert!(!page.contains("id=\"wipe\""), "{page}");
    assert!(!page.contains("id=\"queue-information\""), "{page}");
    assert!(!page.contains("id=\"retire\""), "{page}");
    let csrf = hidden_input(&page, "csrf");
    let actions = console.url(&format!("{}/actions", device_path(&device.udid)));

    // The form the page did not show, posted anyway with a valid token and the name typed.
    let forged = browser
        .post_form(
            &actions,
            &[
                ("csrf", &csrf),
                ("action", "wipe"),
                ("confirm", "Simulated Mac"),
            ],
        )
        .await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let text = forged.text().await.unwrap();
    assert!(text.contains("commands:write"), "{text}");
    assert!(console.commands_of(&device.udid).await.is_empty());
    let denied = console
        .audit("actor=admin:oidc:bob&action=command.enqueue")
        .await;
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0]["outcome"], "denied");
    assert_eq!(denied[0]["target"], "EraseDevice");
    assert!(
        denied[0]["detail"]
            .as_str()
            .unwrap()
            .contains("commands:write")
    );
    // Retire is refused the same way.
    let retire = browser
        .post_form(
            &actions,
            &[
                ("csrf", &csrf),
                ("action", "retire"),
                ("confirm", "Simulated Mac"),
            ],
        )
        .await;
    assert_eq!(retire.status(), StatusCode::FORBIDDEN);
    // The audit page is refused too, though its link was not shown.
    let audit = browser.get(&console.url("/admin/audit")).await;
    assert_eq!(audit.status(), StatusCode::FORBIDDEN);

    // What the help desk may do, it can.
    let lock = browser
        .post_form(
            &actions,
            &[("csrf", &csrf), ("action", "lock"), ("message", "Call IT")],
        )
        .await;
    assert_eq!(lock.status(), StatusCode::SEE_OTHER);
    let commands = console.commands_of(&device.udid).await;
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0]["request_type"], "DeviceLock");
    assert_eq!(commands[0]["command"]["Message"], "Call IT");
    // But not cancel it (commands:write).
    let uuid = commands[0]["uuid"].as_str().unwrap();
    let cancel = browser
        .post_form(
            &console.url(&format!("/admin/commands/{uuid}/cancel")),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(cancel.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        console.commands_of(&device.udid).await[0]["status"],
        "queued"
    );
}

#[tokio::test]
async fn a_person_in_no_admin_group_is_refused_with_a_clear_page() {
    let Some(issuer) = peer_env("TRUSTBROKER_TEST_OIDC_ISSUER") else {
        return;
    };
    let console = Console::start(
        &TestDb::Sqlite,
        Some(&issuer),
        "[admin.groups]\nadmins = [\"*\"]\n",
    )
    .await;
    let mut browser = Browser::new(&console.server);
    let page = sign_in(&console, &mut browser, "carol", "carolpw").await;
    assert!(page.contains("none of your groups"), "{page}");
    assert!(browser.cookie("tb_admin").is_none());
    let entries = console.audit("actor=admin:oidc:carol").await;
    assert_eq!(entries[0]["action"], "console.sign-in");
    assert_eq!(entries[0]["outcome"], "denied");
    // A sign-in for the console that the provider turns down ends on the console's page.
    let mut other = Browser::new(&console.server);
    let login = other
        .get(&console.url("/auth/oidc/oidc/login?for=admin"))
        .await;
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let refused = other
        .get(&console.url("/auth/oidc/oidc/callback?error=access_denied&state=whatever"))
        .await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let text = refused.text().await.unwrap();
    assert!(
        text.contains("trustbroker admin") && text.contains("/admin/sign-in"),
        "{text}"
    );
    // The portal's own sign-in is unchanged by the shared flow.
    let login = browser.get(&console.url("/auth/oidc/oidc/login")).await;
    let back = sign_in_at_op(&mut browser, &location(&login), "carol", "carolpw").await;
    let done = browser.get(&to_server(&console.server, &back)).await;
    assert_eq!(location(&done), "/enroll");
}

#[tokio::test]
async fn console_forms_need_the_session_s_csrf_token() {
    let console = Console::start(&TestDb::Sqlite, None, GROUPS).await;
    let device = console.device().await;
    let admin = session(&["admin"], 600, 3600);
    let mut browser = console.browser_with(&admin);
    let page = browser.page(&console.url(&device_path(&device.udid))).await;
    assert_eq!(hidden_input(&page, "csrf"), admin.csrf);
    let actions = console.url(&format!("{}/actions", device_path(&device.udid)));
    let other = trustbroker::enroll::session::random_token();
    for fields in [
        vec![("action", "information")],
        vec![("csrf", ""), ("action", "information")],
        vec![("csrf", other.as_str()), ("action", "information")],
    ] {
        let response = browser.post_form(&actions, &fields).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{fields:?}");
    }
    assert!(console.commands_of(&device.udid).await.is_empty());
    let refused = console.audit("actor=admin:test:dana").await;
    assert_eq!(refused.len(), 3);
    assert!(refused.iter().all(|e| e["outcome"] == "denied"));
    // Sign-out needs it too.
    let out = browser
        .post_form(&console.url("/admin/sign-out"), &[])
        .await;
    assert_eq!(out.status(), StatusCode::FORBIDDEN);
    // Without a session at all: 401, nothing done.
    let mut stranger = Browser::new(&console.server);
    let response = stranger
        .post_form(
            &actions,
            &[("csrf", &admin.csrf), ("action", "information")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(console.commands_of(&device.udid).await.is_empty());
    // With the token, it works.
    let response = browser
        .post_form(
            &actions,
            &[("csrf", &admin.csrf), ("action", "information")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(console.commands_of(&device.udid).await.len(), 1);
}

#[tokio::test]
async fn console_sessions_end_when_idle_or_too_old() {
    let console = Console::start(&TestDb::Sqlite, None, GROUPS).await;
    let device = console.device().await;
    let actions = console.url(&format!("{}/actions", device_path(&device.udid)));
    for (what, stale) in [
        ("idle", session(&["admin"], -1, 3600)),
        ("too old", session(&["admin"], 600, -1)),
    ] {
        let mut browser = console.browser_with(&stale);
        let page = browser.get(&console.url("/admin/devices")).await;
        assert_eq!(page.status(), StatusCode::OK, "{what}");
        let clears = page
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .any(|c| c.to_str().unwrap().starts_with("tb_admin=;"));
        assert!(clears, "{what}: the stale cookie is dropped");
        let text = page.text().await.unwrap();
        assert!(
            text.contains("Sign in to the admin console"),
            "{what}: {text}"
        );
        let mut browser = console.browser_with(&stale);
        let response = browser
            .post_form(
                &actions,
                &[("csrf", &stale.csrf), ("action", "information")],
            )
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        let live = browser
            .get(&console.url(&format!("{}/live", device_path(&device.udid))))
            .await;
        assert_eq!(live.status(), StatusCode::UNAUTHORIZED, "{what}");
    }
    assert!(console.commands_of(&device.udid).await.is_empty());

    // A live session's pages move its idle deadline; the live endpoint does not.
    let fresh = session(&["devices:read"], 120, 3600);
    let mut browser = console.browser_with(&fresh);
    let page = browser.get(&console.url("/admin/devices")).await;
    let cookie = page
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|c| c.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("tb_admin="))
        .expect("the session is re-sealed");
    assert!(cookie.contains("Max-Age=900"), "{cookie}");
    let live = browser
        .get(&console.url(&format!("{}/live", device_path(&device.udid))))
        .await;
    assert_eq!(live.status(), StatusCode::OK);
    assert!(live.headers().get(SET_COOKIE).is_none());
    // A session never outlives its absolute deadline, however active.
    let ending = session(&["devices:read"], 120, 200);
    let mut browser = console.browser_with(&ending);
    let page = browser.get(&console.url("/admin/devices")).await;
    let cookie = page.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    let max_age: i64 = cookie
        .split("Max-Age=")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(max_age <= 200, "{cookie}");

    // A portal session, or a forged value, is no console session.
    let mut browser = Browser::new(&console.server);
    browser.set_cookie("tb_admin", "AAAA");
    let page = browser.page(&console.url("/admin")).await;
    assert!(page.contains("Sign in to the admin console"), "{page}");
}

#[tokio::test]
async fn console_pages_carry_a_strict_content_security_policy() {
    let console = Console::start(&TestDb::Sqlite, None, GROUPS).await;
    let device = console.device().await;
    let mut browser = console.browser_with(&session(&["admin"], 600, 3600));
    let mut stranger = Browser::new(&console.server);
    let sign_in_page = stranger.get(&console.url("/admin/sign-in")).await;
    assert!(
        sign_in_page.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("form-action 'self'")
    );
    for path in [
        "/admin".to_owned(),
        "/admin/devices".to_owned(),
        device_path(&device.udid),
        "/admin/audit".to_owned(),
        "/admin/people".to_owned(),
        "/admin/groups".to_owned(),
        "/admin/devices/NOPE".to_owned(),
    ] {
        let response = browser.get(&console.url(&path)).await;
        let headers = response.headers();
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("style=\"") && !text.contains("<script>"),
            "{path}: {text}"
        );
        assert!(text.contains("name=\"viewport\""), "{path}");
    }
    let css = browser.get(&console.url("/admin/assets/console.css")).await;
    assert_eq!(css.headers()["content-type"], "text/css; charset=utf-8");
    let page = browser.page(&console.url(&device_path(&device.udid))).await;
    assert!(page.contains("<script src=\"/admin/assets/console.js\" defer></script>"));
    // A wipe needs the device's name typed.
    let csrf = hidden_input(&page, "csrf");
    let response = browser
        .post_form(
            &console.url(&format!("{}/actions", device_path(&device.udid))),
            &[
                ("csrf", &csrf),
                ("action", "wipe"),
                ("confirm", "simulated"),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(console.commands_of(&device.udid).await.is_empty());
    let response = browser
        .post_form(
            &console.url(&format!("{}/actions", device_path(&device.udid))),
            &[
                ("csrf", &csrf),
                ("action", "wipe"),
                ("confirm", "Simulated Mac"),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        console.commands_of(&device.udid).await[0]["request_type"],
        "EraseDevice"
    );
    // The device refuses it: the overview warns of a failed command, with its chart.
    let overview = browser.page(&console.url("/admin")).await;
    assert!(overview.contains("Nothing needs attention"), "{overview}");
    let command = device.idle(&console.server).await.expect("the wipe");
    let (uuid, _) = uuid_and_type(&command);
    let mut chain = Dictionary::new();
    chain.insert("ErrorCode".into(), Value::Integer(12021.into()));
    chain.insert("LocalizedDescription".into(), "Not allowed here".into());
    let mut extra = Dictionary::new();
    extra.insert(
        "ErrorChain".into(),
        Value::Array(vec![Value::Dictionary(chain)]),
    );
    let (status, _) = device
        .report(&console.server, "Error", Some(&uuid), extra)
        .await;
    assert_eq!(status, StatusCode::OK);
    let overview = browser.page(&console.url("/admin")).await;
    assert!(
        overview.contains("1 command(s) failed on devices in the last 24 hours"),
        "{overview}"
    );
    assert!(overview.contains("failed: 1"), "{overview}");
    let page = browser.page(&console.url(&device_path(&device.udid))).await;
    assert!(
        page.contains("Not allowed here"),
        "the device's error: {page}"
    );
    // An answered wipe is not re-sent with one click (no button, and refused if posted).
    assert!(
        !page.contains(&format!("/admin/commands/{uuid}/resend")),
        "{page}"
    );
    let resend = browser
        .post_form(
            &console.url(&format!("/admin/commands/{uuid}/resend")),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(resend.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(console.commands_of(&device.udid).await.len(), 1);
}

/// The whole flow as an admin does it, in headless Chromium: the console's SSO button, the
/// provider's login page, the device list's search, "Queue DeviceInformation", and the status
/// turning to acknowledged without a reload when the simulator answers; axe-core finds no
/// serious or critical violation on any page. The broker keeps the public URL the test OP
/// redirects to, but listens on an ephemeral port: the flow sends the browser's requests for the
/// public URL there (no fixed port, so it runs beside the portal's browser test).
#[tokio::test]
async fn an_admin_queues_device_information_in_chromium_and_sees_it_acknowledged_live() {
    let (Some(issuer), Some(portal_flow)) = (
        peer_env("TRUSTBROKER_TEST_OIDC_ISSUER"),
        peer_env("TRUSTBROKER_TEST_BROWSER_FLOW"),
    ) else {
        return;
    };
    let flow = std::path::Path::new(&portal_flow).with_file_name("console-flow.mjs");
    assert!(
        flow.exists(),
        "{} is missing: run tests/peers/browser.sh install",
        flow.display()
    );
    let server = TestServer::start_configured(
        |args| {
            args.public_url = Some(PUBLIC_URL.into());
        },
        &format!("{}{GROUPS}", oidc_toml(&issuer, "")),
    )
    .await;
    let admin = server.admin_key("console-test", &["admin"]).await;
    let (cert, key) = push_certificate(device::TOPIC);
    assert_eq!(
        import_push(&server, &admin, &cert, &key).await.status(),
        StatusCode::OK
    );
    // erin's device, so that a plan for her group has a per-device difference to show.
    let erin = server
        .store()
        .record_sign_in(
            &trustbroker::identity::Identity {
                provider: "corp".into(),
                subject: "erin".into(),
                login: Some("erin".into()),
                email: Some("erin@example.org".into()),
                display_name: None,
                groups: vec![trustbroker::identity::Group {
                    id: "cn=engineering,ou=groups,dc=example,dc=org".into(),
                    name: "engineering".into(),
                }],
            },
            "sign-in",
        )
        .await
        .unwrap();
    let issued = trustbroker::pki::challenge::create(
        server.store(),
        std::time::Duration::from_secs(600),
        trustbroker::pki::challenge::ChallengeRequest {
            requested_by: "test".into(),
            for_user: erin.login.clone(),
            for_device: None,
            user_id: Some(erin.id.clone()),
        },
    )
    .await
    .unwrap();
    let device = Device::enroll(&server, &issued.challenge).await;
    device.check_in(&server).await;
    // A token integration, for the tokens pages.
    let created = server
        .client
        .post(server.url("/api/v1/token-integrations"))
        .bearer_auth(&admin)
        .json(
            &serde_json::json!({"name": "pingid", "bundle_id": "com.pingidentity.pingid",
                                  "config_key": "token"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let rotated = server
        .client
        .post(server.url("/api/v1/token-integrations/pingid/tokens/rotate"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(rotated.status(), StatusCode::CREATED);

    let shots = std::env::var("TRUSTBROKER_TEST_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .ok();
    let scratch = tempfile::tempdir().unwrap();
    let out_dir = shots.unwrap_or_else(|| scratch.path().to_path_buf());
    std::fs::create_dir_all(&out_dir).unwrap();
    let node = tokio::process::Command::new("node")
        .arg(&flow)
        .args([
            PUBLIC_URL,
            "Sign in with Example SSO",
            "alice",
            "alicepw",
            "Simulated Mac",
        ])
        .arg(&out_dir)
        .arg(&server.http_base)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs the console flow");

    // Meanwhile the device checks for work, as a device woken by a push would, and answers.
    let answered = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(command) = device.idle(&server).await {
                let (uuid, kind) = uuid_and_type(&command);
                assert_eq!(kind, "DeviceInformation");
                let (status, _) = device
                    .report(&server, "Acknowledged", Some(&uuid), query_responses())
                    .await;
                assert_eq!(status, StatusCode::OK);
                return Some(uuid);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
    };
    let (out, uuid) = tokio::join!(node.wait_with_output(), answered);
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "console browser flow failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uuid = uuid.expect("the device got the command");
    let result: Json = serde_json::from_slice(&out.stdout).expect("the flow's JSON line");
    assert_eq!(result["status"], "acknowledged", "{result}");
    assert_eq!(result["reloaded"], false, "updated in place: {result}");
    assert_eq!(
        result["cancelShown"], false,
        "an answered command: {result}"
    );
    // The style sheet applied (the Content-Security-Policy allows 'self').
    assert_eq!(result["styled"], "rgb(10, 88, 194)", "{result}");
    let pages = result["violations"].as_object().unwrap();
    // Sign-in, overview, devices, device (twice), people, groups, policies, plan (pasted and
    // uploaded), tokens, an integration (as loaded, revealed, with a new client), audit.
    assert_eq!(pages.len(), 15, "{result}");
    for (page, found) in pages {
        let serious: Vec<&Json> = found
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .collect();
        assert!(serious.is_empty(), "axe on {page}: {serious:#?}");
    }
    let entries = server
        .get_json(
            "/api/v1/audit?actor=admin:oidc:alice&action=command.enqueue",
            Some(&admin),
        )
        .await;
    let detail = entries["entries"][0]["detail"].as_str().unwrap();
    assert!(detail.contains(&uuid), "{detail}");
    server.stop().await;
}

/// The directory's password form on the console's page posts to the portal's LDAP route with
/// `for=admin`: a wrong password comes back to the console's page, the right one opens a console
/// session (and no portal session); groups match by their DN.
#[tokio::test]
async fn ldap_admins_sign_in_with_the_directory_form() {
    let (Some(url), Some(ca)) = (
        peer_env("TRUSTBROKER_TEST_LDAP_URL"),
        peer_env("TRUSTBROKER_TEST_LDAP_CA"),
    ) else {
        return;
    };
    let console = Console::start(
        &TestDb::Sqlite,
        None,
        &format!(
            "{}[admin.groups]\n\"cn=admins,ou=groups,dc=example,dc=org\" = [\"devices:read\", \"audit:read\"]\n",
            crate::portal::ldap_toml(&url, &ca, "brokerpw")
        ),
    )
    .await;
    let mut browser = Browser::new(&console.server);
    let page = browser.page(&console.url("/admin")).await;
    assert!(page.contains("Company directory"), "{page}");
    assert!(page.contains("action=\"/auth/ldap/ldap\""), "{page}");
    assert!(page.contains("name=\"for\" value=\"admin\""), "{page}");
    let csrf = hidden_input(&page, "csrf");
    let form = console.url("/auth/ldap/ldap");
    let wrong = browser
        .post_form(
            &form,
            &[
                ("csrf", &csrf),
                ("for", "admin"),
                ("login", "alice"),
                ("password", "nope"),
            ],
        )
        .await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let text = wrong.text().await.unwrap();
    assert!(
        text.contains("Sign in to the admin console") && text.contains("not right"),
        "{text}"
    );
    let done = browser
        .post_form(
            &form,
            &[
                ("csrf", &csrf),
                ("for", "admin"),
                ("login", "alice"),
                ("password", "alicepw"),
            ],
        )
        .await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&done), "/admin");
    assert!(browser.cookie("tb_admin").is_some());
    assert!(browser.cookie("tb_session").is_none(), "no portal session");
    let overview = browser.page(&console.url("/admin")).await;
    assert!(overview.contains("<h1>Overview</h1>"), "{overview}");
    // devices:read and audit:read, nothing else: no action on devices.
    let audit = browser
        .get(&console.url("/admin/audit?action=console."))
        .await;
    assert_eq!(audit.status(), StatusCode::OK);
    assert!(audit.text().await.unwrap().contains("console.sign-in"));
}

#[tokio::test]
async fn people_and_groups_show_memberships_and_need_users_read() {
    for db in TestDb::all().await {
        people_and_groups_on(&db).await;
    }
}

async fn people_and_groups_on(db: &TestDb) {
    use trustbroker::identity::{Group, Identity};
    let console = Console::start(db, None, GROUPS).await;
    let person = |login: &str, group: &str| Identity {
        provider: "test".into(),
        subject: login.into(),
        login: Some(login.into()),
        email: Some(format!("{login}@example.org")),
        display_name: Some(format!("{login} Example")),
        groups: vec![Group {
            id: format!("cn={group},ou=groups,dc=example,dc=org"),
            name: group.into(),
        }],
    };
    let erin = console
        .server
        .store()
        .record_sign_in(&person("erin", "eng"), "sign-in")
        .await
        .unwrap();
    console
        .server
        .store()
        .record_sign_in(&person("frank", "ops"), "sign-in")
        .await
        .unwrap();

    let mut browser = console.browser_with(&session(&["users:read"], 600, 3600));
    let all = browser.page(&console.url("/admin/people")).await;
    assert!(all.contains("href=\"/admin/people\""), "{all}");
    assert!(
        all.contains("erin Example") && all.contains("frank Example"),
        "{all}"
    );
    let found = browser.page(&console.url("/admin/people?q=ERIN")).await;
    assert!(
        found.contains("erin Example") && !found.contains("frank Example"),
        "{found}"
    );
    let in_group = browser
        .page(&console.url("/admin/people?group=cn%3Dops%2Cou%3Dgroups%2Cdc%3Dexample%2Cdc%3Dorg"))
        .await;
    assert!(in_group.contains("frank Example") && !in_group.contains("erin Example"));
    let page = browser
        .page(&console.url(&format!("/admin/people/{}", erin.id)))
        .await;
    assert!(page.contains("<h1>erin Example</h1>"), "{page}");
    assert!(page.contains("cn=eng,ou=groups,dc=example,dc=org") && page.contains("sign-in"));
    let groups = browser.page(&console.url("/admin/groups")).await;
    assert!(
        groups.contains(">eng</a>") && groups.contains(">ops</a>"),
        "{groups}"
    );
    // No devices:read: no device links.
    assert!(!groups.contains("/admin/devices?group="), "{groups}");

    // Without users:read: no link, and the pages are refused.
    let mut browser = console.browser_with(&session(&["devices:read"], 600, 3600));
    let overview = browser.page(&console.url("/admin")).await;
    assert!(!overview.contains("href=\"/admin/people\""), "{overview}");
    for path in [
        "/admin/people",
        "/admin/groups",
        &format!("/admin/people/{}", erin.id),
    ] {
        let response = browser.get(&console.url(path)).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
    }
}

/// Policies: the version in force and its history, and the plan of a changed file with its
/// line diff and what it would queue on the one device in scope. Nothing is applied.
#[tokio::test]
async fn the_policies_page_plans_a_changed_file_without_applying_it() {
    use trustbroker::identity::{Group, Identity};
    use trustbroker::pki::challenge::{self, ChallengeRequest};
    let console = Console::start(&TestDb::Sqlite, None, GROUPS).await;
    let group = "cn=engineering,ou=groups,dc=example,dc=org";
    let applied = console
        .server
        .client
        .post(console.url("/api/v1/policies/apply"))
        .bearer_auth(&console.admin)
        .json(&serde_json::json!({
            "files": crate::policy::files(&[("engineering.yaml", crate::policy::engineering(group, 8, ""))]),
            "git_commit": "0123abcd",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        applied.status(),
        StatusCode::CREATED,
        "{}",
        applied.text().await.unwrap()
    );
    let user = console
        .server
        .store()
        .record_sign_in(
            &Identity {
                provider: "corp".into(),
                subject: "erin".into(),
                login: Some("erin".into()),
                email: Some("erin@example.org".into()),
                display_name: None,
                groups: vec![Group {
                    id: group.into(),
                    name: "engineering".into(),
                }],
            },
            "sign-in",
        )
        .await
        .unwrap();
    let issued = challenge::create(
        console.server.store(),
        std::time::Duration::from_secs(600),
        ChallengeRequest {
            requested_by: "test".into(),
            for_user: user.login.clone(),
            for_device: None,
            user_id: Some(user.id.clone()),
        },
    )
    .await
    .unwrap();
    let device = Device::enroll(&console.server, &issued.challenge).await;
    device.check_in(&console.server).await;

    let mut browser = console.browser_with(&session(&["policies:read"], 600, 3600));
    let page = browser.page(&console.url("/admin/policies")).await;
    assert!(
        page.contains("Version in force: <strong>1</strong>"),
        "{page}"
    );
    assert!(
        page.contains("0123abcd") && page.contains("engineering.yaml"),
        "{page}"
    );
    let csrf = hidden_input(&page, "csrf");
    let plan_url = console.url("/admin/policies/plan");
    let changed = crate::policy::engineering(group, 12, "");
    let plan = browser
        .post_form(
            &plan_url,
            &[
                ("csrf", &csrf),
                ("path", "engineering.yaml"),
                ("content", &changed),
            ],
        )
        .await;
    assert_eq!(plan.status(), StatusCode::OK);
    let plan = plan.text().await.unwrap();
    assert!(plan.contains("<span class=\"removed\">-"), "{plan}");
    assert!(plan.contains("minLength: 12"), "{plan}");
    assert!(plan.contains("1 device(s) in scope"), "{plan}");
    assert!(plan.contains(">changed<"), "{plan}");
    // Nothing was applied.
    let versions = console
        .server
        .get_json("/api/v1/policies/versions", Some(&console.admin))
        .await;
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        1,
        "{versions}"
    );

    // A broken file: the loader's problems, with file and line.
    let broken = browser
        .post_form(
            &plan_url,
            &[
                ("csrf", &csrf),
                ("path", "engineering.yaml"),
                ("content", "name: ["),
            ],
        )
        .await;
    assert_eq!(broken.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(broken.text().await.unwrap().contains("engineering.yaml"));
    for path in ["../etc/passwd.yaml", "/abs.yaml", "notes.txt", ""] {
        let response = browser
            .post_form(
                &plan_url,
                &[("csrf", &csrf), ("path", path), ("content", "x")],
            )
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}"
        );
    }
    let forged = browser
        .post_form(
            &plan_url,
            &[("path", "engineering.yaml"), ("content", &changed)],
        )
        .await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    // Without policies:read.
    let mut browser = console.browser_with(&session(&["devices:read"], 600, 3600));
    assert_eq!(
        browser.get(&console.url("/admin/policies")).await.status(),
        StatusCode::FORBIDDEN
    );
}

/// Tokens: the integration and its tokens with delivery counts; rotation shows the generated
/// value once; revocation keeps the API's rule (the last active token only with force) and
/// asks for the integration's name; each is audited in the admin's name.
#[tokio::test]
async fn tokens_rotate_and_revoke_with_the_api_s_rules() {
    let console = Console::start(&TestDb::Sqlite, None, GROUPS).await;
    let created = console
        .server
        .client
        .post(console.url("/api/v1/token-integrations"))
        .bearer_auth(&console.admin)
        .json(
            &serde_json::json!({"name": "pingid", "bundle_id": "com.pingidentity.pingid",
                                  "config_key": "token"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.status(),
        StatusCode::CREATED,
        "{}",
        created.text().await.unwrap()
    );

    // Reading only: no rotate form, and a rotation posted anyway is refused.
    let reader = session(&["tokens:read"], 600, 3600);
    let mut browser = console.browser_with(&reader);
    let list = browser.page(&console.url("/admin/tokens")).await;
    assert!(list.contains("href=\"/admin/tokens/pingid\""), "{list}");
    let page = browser.page(&console.url("/admin/tokens/pingid")).await;
    assert!(page.contains("com.pingidentity.pingid") && !page.contains("id=\"rotate\""));
    let refused = browser
        .post_form(
            &console.url("/admin/tokens/pingid/rotate"),
            &[("csrf", &reader.csrf)],
        )
        .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    let writer = session(&["tokens:read", "tokens:write"], 600, 3600);
    let mut browser = console.browser_with(&writer);
    let rotated = browser
        .post_form(
            &console.url("/admin/tokens/pingid/rotate"),
            &[("csrf", &writer.csrf), ("label", "first")],
        )
        .await;
    assert_eq!(rotated.status(), StatusCode::OK);
    assert_eq!(rotated.headers()["cache-control"], "no-store");
    let page = rotated.text().await.unwrap();
    let value = page
        .split("<code id=\"new-token\" class=\"secret\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("the new value, shown once")
        .to_owned();
    assert!(value.len() >= 20, "{value}");
    assert!(
        page.contains(&format!("…{}", &value[value.len() - 4..])),
        "{page}"
    );
    // Shown once: the page loaded again does not have it.
    let again = browser.page(&console.url("/admin/tokens/pingid")).await;
    assert!(!again.contains(&value));
    let tokens = console
        .server
        .get_json(
            "/api/v1/token-integrations/pingid/tokens",
            Some(&console.admin),
        )
        .await;
    let id = tokens["tokens"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(
        tokens["tokens"][0]["created_by"], "admin:test:dana",
        "{tokens}"
    );

    // A policy delivers the token: its last active token is not revoked without "force".
    crate::tokens::apply_delivering(&console.server, &console.admin, &["pingid"]).await;
    let revoke = console.url(&format!("/admin/tokens/pingid/tokens/{id}/revoke"));
    let unconfirmed = browser
        .post_form(&revoke, &[("csrf", &writer.csrf), ("confirm", "ping")])
        .await;
    assert_eq!(unconfirmed.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let last = browser
        .post_form(&revoke, &[("csrf", &writer.csrf), ("confirm", "pingid")])
        .await;
    assert_eq!(last.status(), StatusCode::CONFLICT);
    let forced = browser
        .post_form(
            &revoke,
            &[
                ("csrf", &writer.csrf),
                ("confirm", "pingid"),
                ("force", "1"),
            ],
        )
        .await;
    assert_eq!(forced.status(), StatusCode::OK);
    assert!(forced.text().await.unwrap().contains("status revoked"));
    let entries = console.audit("actor=admin:test:dana").await;
    let seen: Vec<(String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("token.rotate", "denied"),
        ("token.rotate", "success"),
        ("token.revoke", "failure"),
        ("token.revoke", "success"),
    ] {
        assert!(
            seen.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} in {seen:?}"
        );
    }
}

/// SAML through the same ACS as the portal: the sign-in state carries the console as its
/// target; a replayed Response is refused on the console's page.
#[tokio::test]
async fn saml_admins_sign_in_through_the_shared_acs() {
    let Some(metadata) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let console = Console::start(
        &TestDb::Sqlite,
        None,
        &format!(
            "[idp.saml]\ntype = \"saml\"\nlabel = \"SimpleSAMLphp\"\nmetadata_url = \"{metadata}\"\n{GROUPS}"
        ),
    )
    .await;
    let mut browser = Browser::new(&console.server);
    let page = browser.page(&console.url("/admin/sign-in")).await;
    assert!(page.contains("/auth/saml/saml/login?for=admin"), "{page}");
    let login = browser
        .get(&console.url("/auth/saml/saml/login?for=admin"))
        .await;
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let (response, relay) = crate::saml::idp_login(&location(&login), "carol", "carolpw").await;
    let pending = browser
        .cookie("tb_login")
        .expect("sign-in state")
        .to_owned();
    let mut fields = vec![("SAMLResponse", response.as_str())];
    if let Some(relay) = &relay {
        fields.push(("RelayState", relay));
    }
    let acs = console.url("/auth/saml/saml/acs");
    let done = browser.post_form(&acs, &fields).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&done), "/admin");
    assert!(browser.cookie("tb_admin").is_some());
    assert!(browser.cookie("tb_session").is_none(), "no portal session");
    let overview = browser.page(&console.url("/admin")).await;
    assert!(overview.contains("<h1>Overview</h1>"), "{overview}");
    assert!(
        !overview.contains("href=\"/admin/audit\""),
        "help desk: {overview}"
    );
    let entries = console.audit("action=console.sign-in").await;
    assert_eq!(entries[0]["outcome"], "success");
    assert!(
        entries[0]["actor"]
            .as_str()
            .unwrap()
            .starts_with("admin:saml:")
    );

    let mut attacker = Browser::new(&console.server);
    attacker.set_cookie("tb_login", &pending);
    let replayed = attacker.post_form(&acs, &fields).await;
    assert_eq!(replayed.status(), StatusCode::UNAUTHORIZED);
    assert!(attacker.cookie("tb_admin").is_none());
    let text = replayed.text().await.unwrap();
    assert!(text.contains("trustbroker admin"), "{text}");
}

/// A `multipart/form-data` body of `parts` (name, file name, content), as a browser posts a
/// form with a file input: its content type and bytes.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----trustbroker-test-boundary-7d3f";
    let mut body = Vec::new();
    for (name, file, content) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(file) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

impl Console {
    /// Posts a multipart upload with a console session sealed here.
    async fn upload(
        &self,
        path: &str,
        session: &AdminSession,
        parts: &[(&str, Option<&str>, &[u8])],
    ) -> reqwest::Response {
        let (content_type, body) = multipart(parts);
        self.server
            .client
            .post(self.url(path))
            .header("cookie", format!("tb_admin={}", seal(&self.key, session)))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// Runs `sql` on the server's database with `at` as `$1` and `id` as `$2`.
    async fn set_time(&self, db: &TestDb, sql: &str, at: chrono::DateTime<chrono::Utc>, id: &str) {
        match db {
            TestDb::Postgres(pg) => {
                let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
                let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                    .bind(at)
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                assert_eq!(done.rows_affected(), 1, "{sql}");
                pool.close().await;
            }
            TestDb::Sqlite => {
                let data = self
                    .server
                    .server
                    .as_ref()
                    .unwrap()
                    .tls_cert_path
                    .parent()
                    .unwrap()
                    .parent()
                    .unwrap();
                let url = format!("sqlite://{}", data.join("trustbroker.db").display());
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                let done = sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                    .bind(at)
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                assert_eq!(done.rows_affected(), 1, "{sql}");
                pool.close().await;
            }
        }
    }
}

/// erin's device, enrolled for her (in `group` at provider `corp`) and checked in; waits until
/// the reconciler queued what the applied policy gives it.
async fn policy_device(console: &Console, erin: &trustbroker::store::UserRecord) -> Device {
    use trustbroker::pki::challenge::{self, ChallengeRequest};
    let issued = challenge::create(
        console.server.store(),
        std::time::Duration::from_secs(600),
        ChallengeRequest {
            requested_by: "test".into(),
            for_user: erin.login.clone(),
            for_device: None,
            user_id: Some(erin.id.clone()),
        },
    )
    .await
    .unwrap();
    let device = Device::enroll(&console.server, &issued.challenge).await;
    device.check_in(&console.server).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while console.commands_of(&device.udid).await.len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the policy's commands were never queued"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    device
}

/// Policy sets planned from uploaded files (the whole set, or laid over the applied one) and
/// from a directory the operator allows: each device's item-by-item difference, devices with
/// the same difference grouped; nothing applied or queued. Uploads bounded (413), names and
/// paths checked (400/403), CSRF and scope required.
#[tokio::test]
async fn policy_sets_are_planned_from_uploads_and_allowed_directories_per_device() {
    for db in TestDb::all().await {
        planned_per_device_on(&db).await;
    }
}

async fn planned_per_device_on(db: &TestDb) {
    use trustbroker::identity::{Group, Identity};
    let dirs = tempfile::tempdir().unwrap();
    let allowed = dirs.path().join("allowed");
    let outside = dirs.path().join("outside");
    std::fs::create_dir_all(allowed.join("proposal")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let config = format!(
        "[admin]\nplan_paths = [\"{}\"]\n{GROUPS}",
        allowed.display()
    );
    let console = Console::start(db, None, &config).await;
    let group = "cn=engineering,ou=groups,dc=example,dc=org";
    let applied = console
        .server
        .client
        .post(console.url("/api/v1/policies/apply"))
        .bearer_auth(&console.admin)
        .json(&serde_json::json!({
            "files": crate::policy::files(&[("engineering.yaml", crate::policy::engineering(group, 8, ""))]),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(applied.status(), StatusCode::CREATED);
    let erin = console
        .server
        .store()
        .record_sign_in(
            &Identity {
                provider: "corp".into(),
                subject: "erin".into(),
                login: Some("erin".into()),
                email: Some("erin@example.org".into()),
                display_name: None,
                groups: vec![Group {
                    id: group.into(),
                    name: "engineering".into(),
                }],
            },
            "sign-in",
        )
        .await
        .unwrap();
    let first = policy_device(&console, &erin).await;
    let second = policy_device(&console, &erin).await;
    let queued_before = (
        console.commands_of(&first.udid).await.len(),
        console.commands_of(&second.udid).await.len(),
    );
    let reader = session(&["policies:read"], 600, 3600);
    let changed = crate::policy::engineering(group, 12, "");
    let other = "name: other\ntargets:\n  groups:\n    - { provider: corp, id: \"cn=staff,ou=groups,dc=example,dc=org\" }\nprofiles:\n  - name: short\n    payloads:\n      - { PayloadType: com.apple.mobiledevice.passwordpolicy, minLength: 4 }\n";

    // Several files as the whole set: engineering changed, a new policy for another group.
    let plan = console
        .upload(
            "/admin/policies/plan/upload",
            &reader,
            &[
                ("csrf", None, reader.csrf.as_bytes()),
                ("mode", None, b"replace"),
                ("files", Some("engineering.yaml"), changed.as_bytes()),
                ("files", Some("teams/other.yaml"), other.as_bytes()),
            ],
        )
        .await;
    assert_eq!(plan.status(), StatusCode::OK);
    let page = plan.text().await.unwrap();
    assert!(
        page.contains("2 uploaded file(s) as the whole set"),
        "{page}"
    );
    assert!(
        page.contains("teams/other.yaml <small>(added)</small>"),
        "{page}"
    );
    assert!(
        page.contains("engineering.yaml <small>(changed)</small>"),
        "{page}"
    );
    assert!(page.contains("minLength: 12"), "the file's diff: {page}");
    // Each device's difference: both get the same, grouped, with the reason.
    let per_device = page
        .split("id=\"per-device\"")
        .nth(1)
        .and_then(|rest| rest.split("id=\"diff-h\"").next())
        .expect("per-device section");
    assert!(
        per_device.contains("2 device(s) would get:"),
        "{per_device}"
    );
    assert!(
        per_device.contains("<td>update</td><td class=\"detail\">profile:org.trustbroker.policy.engineering.passcode</td><td>engineering</td><td>corp:cn=engineering,ou=groups,dc=example,dc=org</td>"),
        "{per_device}"
    );
    assert!(
        !per_device.contains("com.pingidentity.pingid"),
        "the app is unchanged: {per_device}"
    );
    assert!(
        per_device.contains(">Simulated Mac</a>"),
        "example devices: {per_device}"
    );
    assert!(
        page.contains("1 different change(s) over the checked-in devices; 0 checked-in"),
        "{page}"
    );

    // Only a new file, laid over the applied set: engineering stays, nothing for these devices.
    let overlay = console
        .upload(
            "/admin/policies/plan/upload",
            &reader,
            &[
                ("csrf", None, reader.csrf.as_bytes()),
                ("mode", None, b"overlay"),
                ("files", Some("other.yaml"), other.as_bytes()),
            ],
        )
        .await;
    assert_eq!(overlay.status(), StatusCode::OK);
    let page = overlay.text().await.unwrap();
    assert!(page.contains("laid over the applied set"), "{page}");
    assert!(page.contains("0 different change(s) over the checked-in devices; 2 checked-in device(s) would get nothing"), "{page}");

    // The whole set without engineering: both devices lose its profile and app (their
    // installs were never offered, so they are called off rather than removed).
    let without = console
        .upload(
            "/admin/policies/plan/upload",
            &reader,
            &[
                ("csrf", None, reader.csrf.as_bytes()),
                ("files", Some("other.yaml"), other.as_bytes()),
            ],
        )
        .await;
    let page = without.text().await.unwrap();
    let per_device = page
        .split("id=\"per-device\"")
        .nth(1)
        .and_then(|rest| rest.split("id=\"diff-h\"").next())
        .expect("per-device section");
    assert!(
        per_device.contains("2 device(s) would get:"),
        "{per_device}"
    );
    assert!(
        per_device.contains(
            "<td>cancel the queued install</td><td class=\"detail\">app:com.pingidentity.pingid</td>"
        ),
        "{per_device}"
    );
    assert!(per_device.contains("<td>leave scope</td>"), "{per_device}");

    // Nothing was applied or queued by any of it.
    let versions = console
        .server
        .get_json("/api/v1/policies/versions", Some(&console.admin))
        .await;
    assert_eq!(
        versions["versions"].as_array().unwrap().len(),
        1,
        "{versions}"
    );
    assert_eq!(
        (
            console.commands_of(&first.udid).await.len(),
            console.commands_of(&second.udid).await.len(),
        ),
        queued_before
    );

    // Bounds: one file over the loader's 1 MiB, a body over max_body_bytes (2 MiB), a name
    // that climbs out, no file, no CSRF token, no policies:read.
    let big = vec![b'#'; 1024 * 1024 + 1];
    let response = console
        .upload(
            "/admin/policies/plan/upload",
            &reader,
            &[
                ("csrf", None, reader.csrf.as_bytes()),
                ("files", Some("big.yaml"), &big),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("big.yaml: larger than 1024 KiB")
    );
    let part = vec![b'#'; 900 * 1024];
    let response = console
        .upload(
            "/admin/policies/plan/upload",
            &reader,
            &[
                ("csrf", None, reader.csrf.as_bytes()),
                ("files", Some("a.yaml"), &part),
                ("files", Some("b.yaml"), &part),
                ("files", Some("c.yaml"), &part),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(response.text().await.unwrap().contains("max_body_bytes"));
    for name in [
        "../escape.yaml",
        "/etc/x.yaml",
        ".git/config.yaml",
        "notes.txt",
    ] {
        let response = console
            .upload(
                "/admin/policies/plan/upload",
                &reader,
                &[
                    ("csrf", None, reader.csrf.as_bytes()),
                    ("files", Some(name), b"x: 1"),
                ],
            )
            .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{name}");
    }
    let response = console
        .upload(
            "/admin/policies/plan/upload",
            &reader,
            &[
                ("csrf", None, reader.csrf.as_bytes()),
                ("files", Some(""), b""),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = console
        .upload(
            "/admin/policies/plan/upload",
            &reader,
            &[("files", Some("engineering.yaml"), changed.as_bytes())],
        )
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let helpdesk = session(&["devices:read"], 600, 3600);
    let response = console
        .upload(
            "/admin/policies/plan/upload",
            &helpdesk,
            &[
                ("csrf", None, helpdesk.csrf.as_bytes()),
                ("files", Some("engineering.yaml"), changed.as_bytes()),
            ],
        )
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    // From a directory the operator allows.
    std::fs::write(allowed.join("proposal/engineering.yaml"), &changed).unwrap();
    std::fs::write(outside.join("engineering.yaml"), &changed).unwrap();
    let mut browser = console.browser_with(&reader);
    let policies = browser.page(&console.url("/admin/policies")).await;
    assert!(policies.contains("id=\"plan-path\""), "{policies}");
    assert!(
        policies.contains("enctype=\"multipart/form-data\""),
        "{policies}"
    );
    let path_url = console.url("/admin/policies/plan/path");
    let proposal = allowed.join("proposal");
    let planned = browser
        .post_form(
            &path_url,
            &[("csrf", &reader.csrf), ("path", proposal.to_str().unwrap())],
        )
        .await;
    assert_eq!(planned.status(), StatusCode::OK);
    let page = planned.text().await.unwrap();
    assert!(
        page.contains("2 device(s) would get:") && page.contains("<td>update</td>"),
        "{page}"
    );
    // Outside the allowed directories: by its own path, by "..", by a symbolic link.
    std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
    let escapes = [
        outside.display().to_string(),
        format!("{}/../outside", allowed.display()),
        allowed.join("link").display().to_string(),
    ];
    for path in &escapes {
        let refused = browser
            .post_form(&path_url, &[("csrf", &reader.csrf), ("path", path)])
            .await;
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{path}");
        let text = refused.text().await.unwrap();
        assert!(
            text.contains("not inside a directory the operator allows")
                || text.contains("may not contain"),
            "{path}: {text}"
        );
    }
    let relative = browser
        .post_form(&path_url, &[("csrf", &reader.csrf), ("path", "proposal")])
        .await;
    assert_eq!(relative.status(), StatusCode::BAD_REQUEST);
    let refused = console.audit("action=console.policies.plan").await;
    assert!(
        refused.iter().filter(|e| e["outcome"] == "denied").count() >= 3,
        "{refused:?}"
    );
    assert_eq!(
        console
            .server
            .get_json("/api/v1/policies/versions", Some(&console.admin))
            .await["versions"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

async fn post(
    browser: &mut Browser,
    url: String,
    pairs: Vec<(String, String)>,
) -> reqwest::Response {
    let borrowed: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    browser.post_form(&url, &borrowed).await
}

/// Token integrations created, tokens generated and imported, app clients issued and a token
/// revealed from the console: the API's rules and audit records, in the admin's name, and
/// each form hidden and refused without its scope.
#[tokio::test]
async fn integrations_tokens_clients_and_reveals_with_the_api_s_rules() {
    for db in TestDb::all().await {
        integrations_on(&db).await;
    }
}

async fn integrations_on(db: &TestDb) {
    let console = Console::start(db, None, GROUPS).await;
    let reader = session(&["tokens:read"], 600, 3600);
    let mut browser = console.browser_with(&reader);
    let list = browser.page(&console.url("/admin/tokens")).await;
    assert!(!list.contains("id=\"create-integration\""), "{list}");
    let fields = |csrf: &str| {
        vec![
            ("csrf".to_owned(), csrf.to_owned()),
            ("name".to_owned(), "vendor".to_owned()),
            ("display_name".to_owned(), "Vendor App".to_owned()),
            ("bundle_id".to_owned(), "com.vendor.app".to_owned()),
            ("config_key".to_owned(), "authToken".to_owned()),
            ("overlap_secs".to_owned(), "600".to_owned()),
        ]
    };
    let refused = post(
        &mut browser,
        console.url("/admin/tokens"),
        fields(&reader.csrf),
    )
    .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);

    let writer = session(&["tokens:read", "tokens:write"], 600, 3600);
    let mut browser = console.browser_with(&writer);
    let list = browser.page(&console.url("/admin/tokens")).await;
    assert!(list.contains("id=\"create-integration\""), "{list}");
    let mut bad = fields(&writer.csrf);
    bad[1].1 = "Not A Name!".into();
    let invalid = post(&mut browser, console.url("/admin/tokens"), bad).await;
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let created = post(
        &mut browser,
        console.url("/admin/tokens"),
        fields(&writer.csrf),
    )
    .await;
    assert_eq!(created.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&created), "/admin/tokens/vendor");
    let shown = console
        .server
        .get_json("/api/v1/token-integrations/vendor", Some(&console.admin))
        .await;
    assert_eq!(shown["bundle_id"], "com.vendor.app", "{shown}");
    assert_eq!(shown["overlap_secs"], 600, "{shown}");

    // Imported: the value is never shown back; generated: shown once.
    let imported_value = "vendor-portal-value-9876";
    let tokens_url = console.url("/admin/tokens/vendor/tokens");
    let imported = browser
        .post_form(
            &tokens_url,
            &[
                ("csrf", &writer.csrf),
                ("label", "from vendor"),
                ("value", imported_value),
            ],
        )
        .await;
    assert_eq!(imported.status(), StatusCode::OK);
    let page = imported.text().await.unwrap();
    assert!(!page.contains(imported_value) && !page.contains("id=\"new-token\""));
    assert!(page.contains("…9876 (imported)"), "{page}");
    let generated = browser
        .post_form(&tokens_url, &[("csrf", &writer.csrf), ("label", "ours")])
        .await;
    assert_eq!(generated.headers()["cache-control"], "no-store");
    let page = generated.text().await.unwrap();
    assert!(
        page.contains("<code id=\"new-token\" class=\"secret\">"),
        "{page}"
    );
    let bad_time = browser
        .post_form(
            &tokens_url,
            &[("csrf", &writer.csrf), ("expires_at", "tomorrow")],
        )
        .await;
    assert_eq!(bad_time.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // An app client: its secret once.
    let client = browser
        .post_form(
            &console.url("/admin/tokens/vendor/clients"),
            &[("csrf", &writer.csrf), ("name", "vendor-backend")],
        )
        .await;
    assert_eq!(client.status(), StatusCode::OK);
    assert_eq!(client.headers()["cache-control"], "no-store");
    let page = client.text().await.unwrap();
    let secret = page
        .split("<code id=\"client-secret\" class=\"secret\">")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .expect("the client secret")
        .to_owned();
    assert!(secret.len() >= 20, "{secret}");
    let again = browser.page(&console.url("/admin/tokens/vendor")).await;
    assert!(!again.contains(&secret) && again.contains("vendor-backend"));
    let clients = console
        .server
        .get_json(
            "/api/v1/token-integrations/vendor/clients",
            Some(&console.admin),
        )
        .await;
    assert_eq!(clients["clients"].as_array().unwrap().len(), 1, "{clients}");
    let client_id = clients["clients"][0]["id"].as_str().unwrap().to_owned();
    let revoke_client = console.url(&format!("/admin/tokens/vendor/clients/{client_id}/revoke"));
    let unconfirmed = browser
        .post_form(
            &revoke_client,
            &[("csrf", &writer.csrf), ("confirm", "vendor")],
        )
        .await;
    assert_eq!(unconfirmed.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let revoked = browser
        .post_form(
            &revoke_client,
            &[("csrf", &writer.csrf), ("confirm", "vendor-backend")],
        )
        .await;
    assert_eq!(revoked.status(), StatusCode::OK);
    let clients = console
        .server
        .get_json(
            "/api/v1/token-integrations/vendor/clients",
            Some(&console.admin),
        )
        .await;
    assert!(clients["clients"][0]["revoked_at"].is_string(), "{clients}");

    // Reveal: hidden and refused without tokens:reveal, audited either way.
    let tokens = console
        .server
        .get_json(
            "/api/v1/token-integrations/vendor/tokens",
            Some(&console.admin),
        )
        .await;
    let id = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["source"] == "imported")
        .expect("the imported token")["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!again.contains("/reveal"), "{again}");
    let reveal_url = console.url(&format!("/admin/tokens/vendor/tokens/{id}/reveal"));
    let refused = browser
        .post_form(&reveal_url, &[("csrf", &writer.csrf)])
        .await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    let revealer = session(&["tokens:read", "tokens:reveal"], 600, 3600);
    let mut browser = console.browser_with(&revealer);
    let page = browser.page(&console.url("/admin/tokens/vendor")).await;
    assert!(page.contains(&format!("/tokens/{id}/reveal")), "{page}");
    assert!(
        !page.contains("id=\"add-token\""),
        "no tokens:write: {page}"
    );
    let forged = browser.post_form(&reveal_url, &[("csrf", "wrong")]).await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    let revealed = browser
        .post_form(&reveal_url, &[("csrf", &revealer.csrf)])
        .await;
    assert_eq!(revealed.status(), StatusCode::OK);
    assert_eq!(revealed.headers()["cache-control"], "no-store");
    let page = revealed.text().await.unwrap();
    assert!(
        page.contains(&format!(
            "<code id=\"revealed-token\" class=\"secret\">{imported_value}</code>"
        )),
        "{page}"
    );

    let entries = console.audit("actor=admin:test:dana").await;
    let seen: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["target"].as_str().unwrap_or_default().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let target = format!("vendor/{id}");
    let client_target = format!("vendor/{client_id}");
    for (action, target, outcome) in [
        ("token-integration.create", "vendor", "denied"),
        ("token-integration.create", "Not A Name!", "failure"),
        ("token-integration.create", "vendor", "success"),
        ("token.import", "vendor", "success"),
        ("token.create", "vendor", "success"),
        ("app-client.create", "vendor", "success"),
        ("app-client.revoke", client_target.as_str(), "failure"),
        ("app-client.revoke", client_target.as_str(), "success"),
        ("token.reveal", target.as_str(), "denied"),
        ("token.reveal", target.as_str(), "success"),
    ] {
        assert!(
            seen.contains(&(action.to_owned(), target.to_owned(), outcome.to_owned())),
            "{action} {target} {outcome} in {seen:?}"
        );
    }
    // The audit search finds an actor by any part of it, in any case.
    let mut auditor = console.browser_with(&session(&["audit:read"], 600, 3600));
    let found = auditor
        .page(&console.url("/admin/audit?actor=DANA&action=token.reveal"))
        .await;
    assert!(
        found.contains("admin:test:dana") && found.contains("3 record(s)"),
        "{found}"
    );
    let none = auditor
        .page(&console.url("/admin/audit?actor=erin&action=token."))
        .await;
    assert!(none.contains("0 record(s)"), "{none}");
}

/// The overview's charts count each hour in the database: rows placed at known ages are
/// counted in their hour, failures in the warning, rows older than a day left out.
#[tokio::test]
async fn overview_charts_count_rows_per_hour_in_the_database() {
    for db in TestDb::all().await {
        charts_on(&db).await;
    }
}

async fn charts_on(db: &TestDb) {
    use trustbroker::store::CommandStatus;
    let console = Console::start(db, None, GROUPS).await;
    let device = console.device().await;
    let now = trustbroker::store::now();
    let minutes = chrono::Duration::minutes;
    console
        .set_time(
            db,
            "UPDATE mdm_enrollments SET last_seen_at = $1 WHERE id = $2",
            now - minutes(3 * 60 + 20),
            &device.udid,
        )
        .await;
    let mut uuids = Vec::new();
    for query in ["OSVersion", "BatteryLevel", "DeviceName", "ModelName"] {
        let response = console
            .server
            .client
            .post(console.url("/api/v1/commands"))
            .bearer_auth(&console.admin)
            .json(&serde_json::json!({"enrollment_ids": [device.udid],
                "command": {"RequestType": "DeviceInformation", "Queries": [query]}}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Json = response.json().await.unwrap();
        uuids.push(
            body["commands"][0]["command_uuid"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let answered = [
        (CommandStatus::Acknowledged, now - minutes(10)),
        (CommandStatus::Acknowledged, now - minutes(5 * 60 + 10)),
        (CommandStatus::Error, now - minutes(2 * 60 + 30)),
        (CommandStatus::NotNow, now - minutes(30 * 60)),
    ];
    for (uuid, (status, at)) in uuids.iter().zip(answered) {
        console
            .set_time(
                db,
                &format!(
                    "UPDATE mdm_commands SET status = '{}', answered_at = $1 WHERE uuid = $2",
                    status.as_str()
                ),
                at,
                uuid,
            )
            .await;
    }
    let mut browser = console.browser_with(&session(&["devices:read"], 600, 3600));
    let overview = browser.page(&console.url("/admin")).await;
    for expected in [
        "Last 24 hours: 1 channels seen.",
        "1 channels seen 3 h ago",
        "Last 24 hours: 2 acknowledged, 0 not now, 1 failed.",
        "1 acknowledged this hour",
        "1 acknowledged 5 h ago",
        "1 failed 2 h ago",
        "1 command(s) failed on devices in the last 24 hours.",
    ] {
        assert!(overview.contains(expected), "{expected}: {overview}");
    }
}
