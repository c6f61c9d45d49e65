//! The enrollment portal with real identity providers: a person signs in (OpenID Connect
//! against the test OP; LDAP and SAML in their own modules), downloads their profile, the
//! device simulator enrolls with it, and the enrollment belongs to that person with their
//! groups. Plus the portal's own guards: CSRF, sessions, group limits, tampered answers.

use std::collections::BTreeMap;

use der::{Decode, Encode};
use plist::Value;
use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};
use serde_json::Value as Json;

use crate::device::{self, Device};
use crate::harness::{TestDb, TestServer, peer_env};
use crate::profiles::{import_push, push_certificate};

/// The public URL the test IdPs know the broker by (their registered redirect and ACS URLs).
pub const PUBLIC_URL: &str = "http://127.0.0.1:8080";

/// A browser: keeps cookies (all hosts are 127.0.0.1, and cookies ignore ports, as in a real
/// browser) and never follows redirects by itself, so each hop can be checked or rewritten.
pub struct Browser {
    client: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    pub fn new(server: &TestServer) -> Browser {
        let cert = server
            .server
            .as_ref()
            .map(|s| std::fs::read(&s.tls_cert_path).expect("TLS certificate"))
            .expect("running server");
        Self::trusting(&cert)
    }

    /// A browser that trusts exactly `cert` (PEM): a proxy's, say.
    pub fn trusting(cert: &[u8]) -> Browser {
        Browser {
            client: reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(cert).unwrap())
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn absorb(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(SET_COOKIE) {
            let text = value.to_str().unwrap();
            let pair = text.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            let expired = text.contains("Max-Age=0") || text.contains("expires=Thu, 01 Jan 1970");
            if expired || value.is_empty() {
                self.cookies.remove(name.trim());
            } else {
                self.cookies.insert(name.trim().into(), value.into());
            }
        }
    }

    pub async fn get(&mut self, url: &str) -> reqwest::Response {
        let response = self
            .client
            .get(url)
            .header("cookie", self.cookie_header())
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        self.absorb(&response);
        response
    }

    pub async fn post_form(&mut self, url: &str, fields: &[(&str, &str)]) -> reqwest::Response {
        self.post_form_with(url, fields, &[]).await
    }

    /// A form post with extra request headers (what a proxy in front would add, say).
    pub async fn post_form_with(
        &mut self,
        url: &str,
        fields: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .client
            .post(url)
            .header("cookie", self.cookie_header())
            .form(fields);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        self.absorb(&response);
        response
    }

    /// GET a page's text, whatever its status.
    pub async fn page(&mut self, url: &str) -> String {
        self.get(url).await.text().await.expect("a text body")
    }

    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies.get(name).map(String::as_str)
    }

    pub fn set_cookie(&mut self, name: &str, value: &str) {
        self.cookies.insert(name.into(), value.into());
    }
}

pub fn location(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(LOCATION)
        .unwrap_or_else(|| panic!("no Location on a {}", response.status()))
        .to_str()
        .unwrap()
        .to_owned()
}

/// The value of `name="..." value="..."`-style hidden input `name` in a page.
pub fn hidden_input(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} input in {page}"))
        + marker.len();
    page[start..].split('"').next().unwrap().to_owned()
}

/// Replaces the public URL's origin with the test server's real one.
pub fn to_server(server: &TestServer, url: &str) -> String {
    url.replacen(PUBLIC_URL, &server.base, 1)
}

/// Signs in at the test OpenID provider, starting at its authorization URL; returns the
/// redirect back to the broker (public URL) with `code` and `state`.
pub async fn sign_in_at_op(browser: &mut Browser, auth_url: &str, user: &str, pw: &str) -> String {
    let issuer = auth_url.split("/auth").next().unwrap().to_owned();
    let absolute = |u: String| {
        if u.starts_with("http") {
            u
        } else {
            format!("{issuer}{u}")
        }
    };
    let mut next = location(&browser.get(auth_url).await);
    for _ in 0..10 {
        if next.starts_with(PUBLIC_URL) {
            return next;
        }
        next = absolute(next);
        if next.contains("/interaction/") {
            let page = browser.page(&next).await;
            let action = page
                .split("action=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .expect("interaction form")
                .to_owned();
            let fields: Vec<(&str, &str)> = if page.contains("name=\"password\"") {
                vec![("prompt", "login"), ("login", user), ("password", pw)]
            } else {
                vec![("prompt", "consent")]
            };
            let response = browser.post_form(&absolute(action), &fields).await;
            assert_eq!(
                response.status(),
                StatusCode::SEE_OTHER,
                "OP login for {user}"
            );
            next = location(&response);
        } else {
            next = location(&browser.get(&next).await);
        }
    }
    panic!("the OpenID provider never redirected back: {next}");
}

pub fn oidc_toml(issuer: &str, extra: &str) -> String {
    format!(
        "[idp.oidc]\ntype = \"oidc\"\nlabel = \"Example SSO\"\nissuer = \"{issuer}\"\n\
         client_id = \"mdm-broker\"\nclient_secret = \"mdm-broker-secret\"\n\
         scopes = [\"email\", \"profile\", \"groups\"]\n{extra}"
    )
}

/// A portal with the given providers, a push certificate imported, and an admin key.
pub async fn portal_on(db: &TestDb, file_toml: &str) -> (TestServer, String) {
    let url = db.database_url();
    let server = TestServer::start_configured(
        move |args| {
            args.database_url = url;
            args.public_url = Some(PUBLIC_URL.into());
        },
        file_toml,
    )
    .await;
    let admin = server.admin_key("portal-admin", &["admin"]).await;
    let (cert, key) = push_certificate(device::TOPIC);
    assert_eq!(
        import_push(&server, &admin, &cert, &key).await.status(),
        StatusCode::OK
    );
    (server, admin)
}

/// After sign-in: the portal page, the profile download, and the challenge inside it.
pub async fn download_profile(server: &TestServer, browser: &mut Browser) -> String {
    let page = browser.get(&server.url("/enroll")).await;
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(page.contains("Download enrollment profile"), "{page}");
    let csrf = hidden_input(&page, "csrf");
    let response = browser
        .post_form(&server.url("/enroll/profile"), &[("csrf", &csrf)])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/x-apple-aspen-config"
    );
    let signed = response.bytes().await.unwrap();
    challenge_in(&signed)
}

/// The SCEP challenge in a signed `.mobileconfig`.
fn challenge_in(signed: &[u8]) -> String {
    let info = cms::content_info::ContentInfo::from_der(signed).expect("CMS ContentInfo");
    let data = info
        .content
        .decode_as::<cms::signed_data::SignedData>()
        .expect("SignedData");
    let content = data.encap_content_info.econtent.expect("attached content");
    let xml = der::asn1::OctetString::from_der(&content.to_der().unwrap()).unwrap();
    let profile = Value::from_reader(std::io::Cursor::new(xml.as_bytes().to_vec())).unwrap();
    let payloads = profile.as_dictionary().unwrap()["PayloadContent"]
        .as_array()
        .unwrap();
    payloads
        .iter()
        .map(|p| p.as_dictionary().unwrap())
        .find(|p| p["PayloadType"].as_string() == Some("com.apple.security.scep"))
        .and_then(|p| p["PayloadContent"].as_dictionary())
        .and_then(|c| c["Challenge"].as_string())
        .expect("a SCEP challenge")
        .to_owned()
}

/// The device simulator enrolls with `challenge` and checks in; returns the enrollment as the
/// admin API shows it.
pub async fn enroll_device(server: &TestServer, admin: &str, challenge: &str) -> (Device, Json) {
    let device = Device::enroll(server, challenge).await;
    device.check_in(server).await;
    let enrollment = server
        .get_json(&format!("/api/v1/enrollments/{}", device.udid), Some(admin))
        .await;
    (device, enrollment)
}

/// Two fields of each of a person's groups, as `GET /api/v1/users/{id}` lists them.
fn group_fields<'a>(user: &'a Json, first: &str, second: &str) -> Vec<(&'a str, &'a str)> {
    user["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| (g[first].as_str().unwrap(), g[second].as_str().unwrap()))
        .collect()
}

/// A person as `GET /api/v1/users/{id}` shows them, with groups and devices.
pub async fn user_groups(server: &TestServer, admin: &str, user_id: &str) -> Json {
    server
        .get_json(&format!("/api/v1/users/{user_id}"), Some(admin))
        .await
}

#[tokio::test]
async fn oidc_sign_in_enrolls_a_device_that_belongs_to_the_person() {
    let Some(issuer) = peer_env("TRUSTBROKER_TEST_OIDC_ISSUER") else {
        return;
    };
    for db in TestDb::all().await {
        let (server, admin) = portal_on(&db, &oidc_toml(&issuer, "")).await;
        let mut browser = Browser::new(&server);
        let page = browser.page(&server.url("/enroll")).await;
        assert!(page.contains("Sign in with Example SSO"), "{page}");

        let login = browser.get(&server.url("/auth/oidc/oidc/login")).await;
        assert_eq!(login.status(), StatusCode::SEE_OTHER);
        let auth_url = location(&login);
        assert!(auth_url.starts_with(&issuer), "{auth_url}");
        for param in [
            "code_challenge_method=S256",
            "nonce=",
            "state=",
            "scope=openid",
        ] {
            assert!(auth_url.contains(param), "{param} missing from {auth_url}");
        }
        let back = sign_in_at_op(&mut browser, &auth_url, "bob", "bobpw").await;
        assert!(
            back.starts_with(&format!("{PUBLIC_URL}/auth/oidc/oidc/callback?")),
            "{back}"
        );
        let done = browser.get(&to_server(&server, &back)).await;
        assert_eq!(done.status(), StatusCode::SEE_OTHER, "{}", db.name());
        assert_eq!(location(&done), "/enroll");
        let cookie = done
            .headers()
            .get_all(SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .find(|c| c.starts_with("tb_session="))
            .expect("a session cookie");
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
            "{cookie}"
        );

        let page = browser.page(&server.url("/enroll")).await;
        assert!(
            page.contains("Bob Brown") && page.contains("bob@example.org"),
            "{page}"
        );
        assert!(
            page.contains("mdm-users") && page.contains("staff"),
            "{page}"
        );

        let challenge = download_profile(&server, &mut browser).await;
        let (device, enrollment) = enroll_device(&server, &admin, &challenge).await;
        let owner = &enrollment["owner"];
        assert_eq!(
            owner["email"],
            "bob@example.org",
            "{}: {enrollment}",
            db.name()
        );
        assert_eq!(owner["provider"], "oidc");
        let user_id = owner["id"].as_str().unwrap().to_owned();

        let user = user_groups(&server, &admin, &user_id).await;
        assert_eq!(user["subject"], "bob");
        assert_eq!(user["login"], "bob");
        let groups = group_fields(&user, "external_id", "source");
        assert_eq!(groups, [("mdm-users", "sign-in"), ("staff", "sign-in")]);
        assert!(user["groups"][0]["last_seen_at"].is_string());
        let devices: Vec<&str> = user["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["udid"].as_str().unwrap())
            .collect();
        assert_eq!(devices, [device.udid.as_str()]);

        let users = server.get_json("/api/v1/users", Some(&admin)).await;
        assert_eq!(users["users"].as_array().unwrap().len(), 1);
        let all_groups = server.get_json("/api/v1/groups", Some(&admin)).await;
        let staff = all_groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["external_id"] == "staff")
            .expect("the staff group");
        assert_eq!(staff["members"], 1);
        // The sign-in and the profile are in the audit log under the person's name.
        let audit = server
            .get_json("/api/v1/audit?actor=user:oidc:bob", Some(&admin))
            .await;
        let actions: Vec<&str> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert!(actions.contains(&"portal.sign-in"), "{audit}");
        assert!(actions.contains(&"enrollment-profile.create"), "{audit}");
        server.stop().await;
    }
}

#[tokio::test]
async fn oidc_refuses_a_tampered_state_a_wrong_nonce_and_a_replayed_code() {
    let Some(issuer) = peer_env("TRUSTBROKER_TEST_OIDC_ISSUER") else {
        return;
    };
    // Through the portal: a callback whose state was changed.
    let (server, _) = portal_on(&TestDb::Sqlite, &oidc_toml(&issuer, "")).await;
    let mut browser = Browser::new(&server);
    let auth_url = location(&browser.get(&server.url("/auth/oidc/oidc/login")).await);
    let back = sign_in_at_op(&mut browser, &auth_url, "carol", "carolpw").await;
    let tampered = back.replace("state=", "state=x");
    let refused = browser.get(&to_server(&server, &tampered)).await;
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(browser.cookie("tb_session").is_none());
    // A callback without the sign-in cookie (another browser, or an expired sign-in).
    let mut stranger = Browser::new(&server);
    let refused = stranger.get(&to_server(&server, &back)).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    let users = server.store().list_users(None, 10).await.unwrap();
    assert!(users.is_empty(), "nobody signed in");
    server.stop().await;

    // At the provider: the nonce and code checks.
    use trustbroker::identity::IdpError;
    use trustbroker::identity::oidc::{OidcProvider, OidcSettings};
    let settings: OidcSettings = toml::from_str(&format!(
        "issuer = \"{issuer}\"\nclient_id = \"mdm-broker\"\n\
         client_secret = \"mdm-broker-secret\"\nscopes = [\"email\", \"profile\", \"groups\"]"
    ))
    .unwrap();
    let provider = OidcProvider::new(
        "oidc",
        &settings,
        &format!("{PUBLIC_URL}/auth/oidc/oidc/callback"),
    )
    .unwrap();
    let mut browser = Browser::new(&TestServer::start().await);
    let (url, pending) = provider.begin().await.unwrap();
    let back = sign_in_at_op(&mut browser, &url, "alice", "alicepw").await;
    let query: BTreeMap<String, String> = reqwest::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let mut wrong_nonce = pending.clone();
    wrong_nonce.nonce = "not-the-nonce".into();
    let refused = provider
        .finish(&wrong_nonce, &query["state"], &query["code"])
        .await;
    assert!(
        matches!(refused, Err(IdpError::Refused(ref m)) if m.contains("ID token")),
        "{refused:?}"
    );
    // The code was spent by that attempt: the OP refuses it a second time, right nonce or not.
    let replayed = provider
        .finish(&pending, &query["state"], &query["code"])
        .await;
    assert!(
        matches!(replayed, Err(IdpError::Refused(ref m)) if m.contains("token request")),
        "{replayed:?}"
    );

    // A fresh sign-in with the right values works, and carries groups from the ID token.
    let (url, pending) = provider.begin().await.unwrap();
    let back = sign_in_at_op(&mut browser, &url, "alice", "alicepw").await;
    let query: BTreeMap<String, String> = reqwest::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect();
    let alice = provider
        .finish(&pending, &query["state"], &query["code"])
        .await
        .unwrap();
    assert_eq!(alice.subject, "alice");
    assert_eq!(alice.email.as_deref(), Some("alice@example.org"));
    assert_eq!(alice.display_name.as_deref(), Some("Alice Anderson"));
    let groups: Vec<&str> = alice.groups.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(groups, ["admins", "staff"]);
    assert!(
        provider
            .finish(&pending, &query["state"], &query["code"])
            .await
            .is_err(),
        "a code works once"
    );
}

#[tokio::test]
async fn only_members_of_allowed_groups_may_enroll() {
    let Some(issuer) = peer_env("TRUSTBROKER_TEST_OIDC_ISSUER") else {
        return;
    };
    let toml = oidc_toml(&issuer, "[enroll]\nallowed_groups = [\"mdm-users\"]\n");
    let (server, _) = portal_on(&TestDb::Sqlite, &toml).await;
    let mut alice = Browser::new(&server);
    let auth_url = location(&alice.get(&server.url("/auth/oidc/oidc/login")).await);
    let back = sign_in_at_op(&mut alice, &auth_url, "alice", "alicepw").await;
    let refused = alice.get(&to_server(&server, &back)).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.text().await.unwrap().contains("not in a group"));
    assert!(alice.cookie("tb_session").is_none());

    let mut carol = Browser::new(&server);
    let auth_url = location(&carol.get(&server.url("/auth/oidc/oidc/login")).await);
    let back = sign_in_at_op(&mut carol, &auth_url, "carol", "carolpw").await;
    let done = carol.get(&to_server(&server, &back)).await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    assert!(carol.cookie("tb_session").is_some());
    server.stop().await;
}

/// A valid session with the wrong CSRF token (a form posted from another site while the person
/// is signed in): refused, nothing made, nobody signed out; the right token then works.
#[tokio::test]
async fn a_signed_in_person_s_forms_need_their_own_csrf_token() {
    let portal = KeyedPortal::start(&TestDb::Sqlite, PUBLIC_URL, "").await;
    let (mut browser, csrf) = portal.signed_in("dora").await;
    let page = browser.page(&portal.server.url("/enroll")).await;
    assert!(page.contains("Download enrollment profile"), "{page}");
    assert_eq!(hidden_input(&page, "csrf"), csrf);
    // Another valid token (of the sign-in form) is still the wrong one here.
    let wrong = "x".repeat(csrf.len());
    for token in [wrong.as_str(), "", &csrf[1..]] {
        let response = browser
            .post_form(&portal.server.url("/enroll/profile"), &[("csrf", token)])
            .await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{token:?}");
        let response = browser
            .post_form(&portal.server.url("/enroll/sign-out"), &[("csrf", token)])
            .await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{token:?}");
    }
    assert_eq!(portal.unredeemed_profiles("dora").await, 0);
    assert!(browser.cookie("tb_session").is_some(), "still signed in");
    let response = browser
        .post_form(&portal.server.url("/enroll/profile"), &[("csrf", &csrf)])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(portal.unredeemed_profiles("dora").await, 1);
    portal.server.stop().await;
}

#[tokio::test]
async fn portal_forms_need_their_csrf_token_and_a_session() {
    let (server, _) = portal_on(&TestDb::Sqlite, "").await;
    let mut browser = Browser::new(&server);
    let page = browser.get(&server.url("/enroll")).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("No sign-in method is configured")
    );
    assert!(browser.cookie("tb_csrf").is_some());

    // No session: no profile, whatever is posted.
    let response = browser
        .post_form(&server.url("/enroll/profile"), &[("csrf", "x")])
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // A forged session cookie is no session.
    browser.set_cookie("tb_session", "eyJ1c2VyX2lkIjoiYWRtaW4ifQ");
    let response = browser
        .post_form(&server.url("/enroll/profile"), &[("csrf", "x")])
        .await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Unknown providers are 404 pages, not errors in JSON.
    let csrf = browser.cookie("tb_csrf").unwrap().to_owned();
    let response = browser
        .post_form(
            &server.url("/auth/ldap/nope"),
            &[("csrf", &csrf), ("login", "a"), ("password", "b")],
        )
        .await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    for path in ["/auth/oidc/nope/login", "/auth/saml/nope/metadata"] {
        assert_eq!(
            browser.get(&server.url(path)).await.status(),
            StatusCode::NOT_FOUND
        );
    }
    server.stop().await;
}

/// The whole flow as a person does it, in headless Chromium emulating an iPhone: the portal's
/// SSO button, the provider's own login page, back to the portal, the download button. The
/// broker listens on the public URL itself here, since the browser follows every redirect.
#[tokio::test]
async fn a_person_enrolls_through_the_portal_in_chromium() {
    let (Some(issuer), Some(flow)) = (
        peer_env("TRUSTBROKER_TEST_OIDC_ISSUER"),
        peer_env("TRUSTBROKER_TEST_BROWSER_FLOW"),
    ) else {
        return;
    };
    let server = TestServer::start_configured(
        |args| {
            args.public_url = Some(PUBLIC_URL.into());
            args.http_listen = Some("127.0.0.1:8080".parse().unwrap());
        },
        &oidc_toml(&issuer, ""),
    )
    .await;
    let admin = server.admin_key("portal-admin", &["admin"]).await;
    let (cert, key) = push_certificate(device::TOPIC);
    assert_eq!(
        import_push(&server, &admin, &cert, &key).await.status(),
        StatusCode::OK
    );
    let downloads = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new("node")
        .arg(&flow)
        .args([PUBLIC_URL, "Sign in with Example SSO", "carol", "carolpw"])
        .arg(downloads.path())
        .output()
        .await
        .expect("node runs the browser flow");
    assert!(
        out.status.success(),
        "browser flow failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Json = serde_json::from_slice(&out.stdout).expect("the flow's JSON line");
    // The portal's style sheet applied: the Content-Security-Policy allows it by its hash.
    assert_eq!(result["buttonColor"], "rgb(10, 96, 208)", "{result}");
    let shown = result["shown"].as_str().unwrap();
    assert!(
        shown.contains("Carol Clark") && shown.contains("mdm-users"),
        "{shown}"
    );
    let signed = std::fs::read(result["profile"].as_str().unwrap()).expect("the download");
    let challenge = challenge_in(&signed);
    let (_, enrollment) = enroll_device(&server, &admin, &challenge).await;
    assert_eq!(
        enrollment["owner"]["email"], "carol@example.org",
        "{enrollment}"
    );
    server.stop().await;
}

pub fn ldap_toml(url: &str, ca: &str, bind_password: &str) -> String {
    format!(
        "[idp.ldap]\ntype = \"ldap\"\nlabel = \"Company directory\"\nurl = \"{url}\"\n\
         ca_file = \"{ca}\"\nbind_dn = \"cn=broker,ou=services,dc=example,dc=org\"\n\
         bind_password = \"{bind_password}\"\nuser_base = \"ou=people,dc=example,dc=org\"\n\
         groups = \"search\"\ngroup_base = \"ou=groups,dc=example,dc=org\"\n"
    )
}

#[tokio::test]
async fn ldap_sign_in_through_the_portal_form() {
    let (Some(url), Some(ca)) = (
        peer_env("TRUSTBROKER_TEST_LDAP_URL"),
        peer_env("TRUSTBROKER_TEST_LDAP_CA"),
    ) else {
        return;
    };
    let (server, admin) = portal_on(&TestDb::Sqlite, &ldap_toml(&url, &ca, "brokerpw")).await;
    let mut browser = Browser::new(&server);
    let page = browser.page(&server.url("/enroll")).await;
    assert!(page.contains("Company directory"), "{page}");
    let csrf = hidden_input(&page, "csrf");
    let form_url = server.url("/auth/ldap/ldap");

    // Without the page's token (a form posted from another site): refused, nobody signed in.
    let forged = browser
        .post_form(
            &form_url,
            &[
                ("csrf", "forged"),
                ("login", "alice"),
                ("password", "alicepw"),
            ],
        )
        .await;
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    // A wrong password and an unknown user read the same.
    let mut answers = Vec::new();
    for (login, password) in [("alice", "wrong"), ("nobody", "x"), ("*", "alicepw")] {
        let response = browser
            .post_form(
                &form_url,
                &[("csrf", &csrf), ("login", login), ("password", password)],
            )
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{login}");
        let text = response.text().await.unwrap();
        answers.push(text.replace(&csrf, ""));
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "answers differ");
    assert!(answers[0].contains("not right"));
    assert!(browser.cookie("tb_session").is_none());

    let done = browser
        .post_form(
            &form_url,
            &[("csrf", &csrf), ("login", "alice"), ("password", "alicepw")],
        )
        .await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER);
    let challenge = download_profile(&server, &mut browser).await;
    let (_, enrollment) = enroll_device(&server, &admin, &challenge).await;
    assert_eq!(enrollment["owner"]["login"], "alice", "{enrollment}");
    let user = user_groups(&server, &admin, enrollment["owner"]["id"].as_str().unwrap()).await;
    let groups = group_fields(&user, "name", "external_id");
    assert_eq!(
        groups,
        [
            ("admins", "cn=admins,ou=groups,dc=example,dc=org"),
            ("staff", "cn=staff,ou=groups,dc=example,dc=org"),
            ("vpn-users", "cn=vpn-users,ou=groups,dc=example,dc=org"),
        ]
    );

    // Signing out ends the session: the profile button is gone.
    let page = browser.page(&server.url("/enroll")).await;
    let csrf = hidden_input(&page, "csrf");
    let out = browser
        .post_form(&server.url("/enroll/sign-out"), &[("csrf", &csrf)])
        .await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let page = browser.page(&server.url("/enroll")).await;
    assert!(!page.contains("Download enrollment profile"));
    server.stop().await;
}

#[test]
fn idp_test_says_what_is_wrong() {
    let (Some(url), Some(ca), Some(issuer)) = (
        peer_env("TRUSTBROKER_TEST_LDAP_URL"),
        peer_env("TRUSTBROKER_TEST_LDAP_CA"),
        peer_env("TRUSTBROKER_TEST_OIDC_ISSUER"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("trustbroker.toml");
    let write = |text: &str| std::fs::write(&config, text).unwrap();
    let config_arg = config.to_str().unwrap();
    let run = |name: &str| {
        crate::harness::run_cli(
            &[
                "--config",
                config_arg,
                "--public-url",
                PUBLIC_URL,
                "idp",
                "test",
                name,
            ],
            &[],
        )
    };

    // The example configuration the docs point newcomers to works as written.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/examples/test-idps.toml");
    for name in ["ldap", "oidc", "saml"] {
        let (ok, stdout, stderr) =
            crate::harness::run_cli(&["--config", example, "idp", "test", name], &[]);
        assert!(
            ok && stdout.contains(&format!("{name}: ready")),
            "{name}: {stdout}{stderr}"
        );
    }
    let (ok, stdout, _) = crate::harness::run_cli(&["--config", example, "idp", "list"], &[]);
    assert!(
        ok && stdout.contains("http://127.0.0.1:8080/auth/saml/saml/acs"),
        "{stdout}"
    );

    write(&(ldap_toml(&url, &ca, "brokerpw") + &oidc_toml(&issuer, "")));
    let (ok, stdout, stderr) = run("ldap");
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("service bind as cn=broker") && stdout.contains("ldap: ready"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = run("oidc");
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("{PUBLIC_URL}/auth/oidc/oidc/callback")),
        "{stdout}"
    );
    let (ok, _, stderr) = run("nope");
    assert!(!ok && stderr.contains("configured: ldap, oidc"), "{stderr}");

    write(&ldap_toml(&url, &ca, "wrong-password"));
    let (ok, _, stderr) = run("ldap");
    assert!(
        !ok && stderr.contains("misconfigured") && stderr.contains("bind"),
        "{stderr}"
    );
    write(&ldap_toml("ldap://127.0.0.1:1", &ca, "brokerpw"));
    let (ok, _, stderr) = run("ldap");
    assert!(!ok && stderr.contains("cannot be reached"), "{stderr}");
    write(&oidc_toml("http://127.0.0.1:1", ""));
    let (ok, _, stderr) = run("oidc");
    assert!(!ok && stderr.contains("cannot be reached"), "{stderr}");
    // The discovery document names another issuer than configured (a trailing slash is enough).
    write(&oidc_toml(&format!("{issuer}/"), ""));
    let (ok, _, stderr) = run("oidc");
    assert!(
        !ok && stderr.contains("misconfigured") && stderr.contains("issuer"),
        "{stderr}"
    );
}

#[tokio::test]
async fn saml_sign_in_through_the_portal_and_a_replayed_response_is_refused() {
    let Some(metadata) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let toml = format!(
        "[idp.saml]\ntype = \"saml\"\nlabel = \"SimpleSAMLphp\"\nmetadata_url = \"{metadata}\"\n"
    );
    for db in TestDb::all().await {
        let (server, admin) = portal_on(&db, &toml).await;
        // The SP metadata at its stable URL names itself as the entity ID.
        let sp = browser_text(&server, "/auth/saml/saml/metadata").await;
        assert!(
            sp.contains(&format!(
                "entityID=\"{PUBLIC_URL}/auth/saml/saml/metadata\""
            )),
            "{sp}"
        );
        assert!(
            sp.contains(&format!("Location=\"{PUBLIC_URL}/auth/saml/saml/acs\"")),
            "{sp}"
        );

        let mut browser = Browser::new(&server);
        let login = browser.get(&server.url("/auth/saml/saml/login")).await;
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
        let acs = server.url("/auth/saml/saml/acs");
        let done = browser.post_form(&acs, &fields).await;
        assert_eq!(done.status(), StatusCode::SEE_OTHER, "{}", db.name());
        let challenge = download_profile(&server, &mut browser).await;
        let (_, enrollment) = enroll_device(&server, &admin, &challenge).await;
        assert_eq!(
            enrollment["owner"]["email"], "carol@example.org",
            "{enrollment}"
        );
        let user = user_groups(&server, &admin, enrollment["owner"]["id"].as_str().unwrap()).await;
        let groups: Vec<&str> = user["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["external_id"].as_str().unwrap())
            .collect();
        assert_eq!(groups, ["mdm-users", "staff"]);

        // The same Response again, with the same sign-in state: the replay cache refuses it.
        let mut attacker = Browser::new(&server);
        attacker.set_cookie("tb_login", &pending);
        let replayed = attacker.post_form(&acs, &fields).await;
        assert_eq!(replayed.status(), StatusCode::UNAUTHORIZED, "{}", db.name());
        assert!(attacker.cookie("tb_session").is_none());
        // Without the state (an unsolicited Response): IdP-initiated sign-in is off.
        let mut stranger = Browser::new(&server);
        let unsolicited = stranger.post_form(&acs, &fields).await;
        assert_eq!(unsolicited.status(), StatusCode::UNAUTHORIZED);
        server.stop().await;
    }
}

async fn browser_text(server: &TestServer, path: &str) -> String {
    let response = Browser::new(server).get(&server.url(path)).await;
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    response.text().await.unwrap()
}

#[tokio::test]
async fn repeated_wrong_passwords_are_throttled_without_asking_the_directory() {
    let (Some(url), Some(ca)) = (
        peer_env("TRUSTBROKER_TEST_LDAP_URL"),
        peer_env("TRUSTBROKER_TEST_LDAP_CA"),
    ) else {
        return;
    };
    let (server, _) = portal_on(&TestDb::Sqlite, &ldap_toml(&url, &ca, "brokerpw")).await;
    let mut browser = Browser::new(&server);
    let page = browser.page(&server.url("/enroll")).await;
    let csrf = hidden_input(&page, "csrf");
    let form_url = server.url("/auth/ldap/ldap");
    let mut attempt = async |login: &str, password: &str| {
        browser
            .post_form(
                &form_url,
                &[("csrf", &csrf), ("login", login), ("password", password)],
            )
            .await
    };
    for _ in 0..trustbroker::enroll::throttle::PER_LOGIN {
        assert_eq!(
            attempt("bob", "guess").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Now even the right password is refused, with a page that says to wait.
    let throttled = attempt("bob", "bobpw").await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(
        throttled
            .text()
            .await
            .unwrap()
            .contains("Too many failed sign-ins")
    );
    // Another person at the same address is not affected.
    assert_eq!(
        attempt("carol", "carolpw").await.status(),
        StatusCode::SEE_OTHER
    );
    server.stop().await;
}

/// A portal whose master key the test knows, so it can seal a person's session itself (no
/// identity provider needed), with a push certificate imported.
pub struct KeyedPortal {
    pub server: TestServer,
    pub admin: String,
    key: trustbroker::secrets::MasterKey,
    secure: bool,
    _key_dir: tempfile::TempDir,
}

impl KeyedPortal {
    /// `public_url` decides the cookie policy: HTTPS or plain http.
    pub async fn start(db: &TestDb, public_url: &str, file_toml: &str) -> KeyedPortal {
        let key_dir = tempfile::tempdir().unwrap();
        let key_file = key_dir.path().join("secret.key");
        let hex_key = "5a".repeat(32);
        std::fs::write(&key_file, &hex_key).unwrap();
        let url = db.database_url();
        let public = public_url.to_owned();
        let server = TestServer::start_configured(
            move |args| {
                args.database_url = url;
                args.public_url = Some(public);
                args.secret_key_file = Some(key_file);
            },
            file_toml,
        )
        .await;
        let admin = server.admin_key("portal-admin", &["admin"]).await;
        let (cert, key) = push_certificate(device::TOPIC);
        assert_eq!(
            import_push(&server, &admin, &cert, &key).await.status(),
            StatusCode::OK
        );
        KeyedPortal {
            server,
            admin,
            key: trustbroker::secrets::MasterKey::parse(&hex_key).unwrap(),
            secure: public_url.starts_with("https://"),
            _key_dir: key_dir,
        }
    }

    /// The session cookie's name under this portal's policy.
    pub fn session_cookie(&self) -> String {
        self.policy()
            .name(trustbroker::enroll::session::SESSION_COOKIE)
    }

    fn policy(&self) -> trustbroker::enroll::session::CookiePolicy {
        trustbroker::enroll::session::CookiePolicy {
            secure: self.secure,
        }
    }

    /// `login` recorded as a person, as a sign-in does (again: it is an upsert); their id.
    async fn person(&self, login: &str) -> String {
        let identity = trustbroker::identity::Identity {
            provider: "test".into(),
            subject: login.into(),
            login: Some(login.into()),
            email: Some(format!("{login}@example.org")),
            display_name: None,
            groups: Vec::new(),
        };
        let user = self
            .server
            .store()
            .record_sign_in(&identity, "sign-in")
            .await
            .unwrap();
        user.id
    }

    /// A sealed session for `login`, and its CSRF token.
    pub async fn session(&self, login: &str) -> (String, String) {
        use trustbroker::enroll::session::{Session, seal_session};
        let user_id = self.person(login).await;
        let csrf = trustbroker::enroll::session::random_token();
        let session = Session {
            user_id,
            provider: "test".into(),
            csrf: csrf.clone(),
            expires_at: chrono::Utc::now().timestamp() + 600,
        };
        (seal_session(&self.key, &session), csrf)
    }

    /// A browser signed in as `login`, and its session's CSRF token.
    pub async fn signed_in(&self, login: &str) -> (Browser, String) {
        let (sealed, csrf) = self.session(login).await;
        let mut browser = Browser::new(&self.server);
        browser.set_cookie(&self.session_cookie(), &sealed);
        (browser, csrf)
    }

    /// Challenges issued to `login`'s enrollments that no device has redeemed.
    pub async fn unredeemed_profiles(&self, login: &str) -> usize {
        let user_id = self.person(login).await;
        let since = chrono::Utc::now() - chrono::Duration::days(1);
        self.server
            .store()
            .unredeemed_profiles_since(&user_id, since)
            .await
            .unwrap()
            .len()
    }
}

/// Posts the download form; the response.
async fn post_download(
    server: &TestServer,
    browser: &mut Browser,
    csrf: &str,
) -> reqwest::Response {
    browser
        .post_form(&server.url("/enroll/profile"), &[("csrf", csrf)])
        .await
}

fn assert_security_headers(response: &reqwest::Response, what: &str) {
    let headers = response.headers();
    let header = |name: &str| {
        headers
            .get(name)
            .unwrap_or_else(|| panic!("{what}: no {name}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    let policy = header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
        "base-uri 'none'",
    ] {
        assert!(
            policy.contains(directive),
            "{what}: {directive} not in {policy}"
        );
    }
    assert!(!policy.contains("unsafe-inline"), "{what}: {policy}");
    assert_eq!(header("x-frame-options"), "DENY", "{what}");
    assert_eq!(header("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(header("referrer-policy"), "no-referrer", "{what}");
    assert_eq!(header("cache-control"), "no-store", "{what}");
}

/// The `'sha256-…'` source the policy must name for a page's inline style sheet.
fn style_hash(page: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let style = page
        .split("<style>")
        .nth(1)
        .and_then(|rest| rest.split("</style>").next())
        .expect("an inline style sheet");
    let digest = sha2::Sha256::digest(style.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[tokio::test]
async fn every_portal_answer_carries_the_security_headers() {
    let portal = KeyedPortal::start(&TestDb::Sqlite, PUBLIC_URL, "").await;
    let server = &portal.server;
    let mut stranger = Browser::new(server);
    // The sign-in page: its style sheet is allowed by its hash, and nothing else inline.
    let page = stranger.get(&server.url("/enroll")).await;
    assert_eq!(page.status(), StatusCode::OK);
    assert_security_headers(&page, "sign-in page");
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = page.text().await.unwrap();
    assert!(policy.contains(&style_hash(&text)), "{policy}");
    assert!(!text.contains("<script"), "{text}");
    // Error pages, a rejected form, a wrong method, a sign-in route.
    let csrf = stranger
        .cookie("tb_csrf")
        .expect("a CSRF cookie")
        .to_owned();
    let checks = [
        (
            stranger
                .post_form(
                    &server.url("/auth/ldap/nope"),
                    &[("csrf", &csrf), ("login", "a"), ("password", "b")],
                )
                .await,
            StatusCode::NOT_FOUND,
            "unknown provider",
        ),
        (
            stranger
                .post_form(
                    &server.url("/auth/ldap/nope"),
                    &[("csrf", "forged"), ("login", "a"), ("password", "b")],
                )
                .await,
            StatusCode::FORBIDDEN,
            "forged sign-in form",
        ),
        (
            stranger.get(&server.url("/auth/oidc/nope/login")).await,
            StatusCode::NOT_FOUND,
            "unknown sign-in",
        ),
        (
            stranger
                .post_form(&server.url("/enroll/profile"), &[("csrf", "x")])
                .await,
            StatusCode::UNAUTHORIZED,
            "download without a session",
        ),
        (
            stranger.get(&server.url("/enroll/profile")).await,
            StatusCode::METHOD_NOT_ALLOWED,
            "wrong method",
        ),
        (
            stranger
                .post_form(&server.url("/auth/ldap/nope"), &[("nothing", "x")])
                .await,
            StatusCode::BAD_REQUEST,
            "incomplete form",
        ),
    ];
    for (response, status, what) in checks {
        assert_eq!(response.status(), status, "{what}");
        assert_security_headers(&response, what);
    }
    // Signed in: the page with the download button, the download, the sign-out redirect.
    let (mut browser, csrf) = portal.signed_in("erin").await;
    let page = browser.get(&server.url("/enroll")).await;
    assert_security_headers(&page, "signed-in page");
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("Download enrollment profile")
    );
    let download = post_download(server, &mut browser, &csrf).await;
    assert_eq!(download.status(), StatusCode::OK);
    assert_security_headers(&download, "profile download");
    let out = browser
        .post_form(&server.url("/enroll/sign-out"), &[("csrf", &csrf)])
        .await;
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    assert_security_headers(&out, "sign-out redirect");
    portal.server.stop().await;
}

#[tokio::test]
async fn cookies_carry_the_host_prefix_on_https_and_plain_names_on_http() {
    // HTTPS (the test server's own listener is the public URL).
    let https = KeyedPortal::start(&TestDb::Sqlite, "https://127.0.0.1:9443", "").await;
    let mut browser = Browser::new(&https.server);
    let page = browser.get(&https.server.url("/enroll")).await;
    let cookies: Vec<String> = page
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    assert_eq!(cookies.len(), 1, "{cookies:?}");
    let csrf = &cookies[0];
    assert!(csrf.starts_with("__Host-tb_csrf="), "{csrf}");
    assert!(
        csrf.contains("; Secure") && csrf.contains("; Path=/;"),
        "{csrf}"
    );
    assert!(!csrf.to_ascii_lowercase().contains("domain="), "{csrf}");
    // A valid session under the bare name (planted by a sibling host, say) is not a session.
    let (sealed, _) = https.session("fred").await;
    let mut planted = Browser::new(&https.server);
    planted.set_cookie("tb_session", &sealed);
    let page = planted.page(&https.server.url("/enroll")).await;
    assert!(!page.contains("Download enrollment profile"), "{page}");
    let mut real = Browser::new(&https.server);
    real.set_cookie("__Host-tb_session", &sealed);
    let page = real.page(&https.server.url("/enroll")).await;
    assert!(page.contains("Download enrollment profile"), "{page}");
    https.server.stop().await;

    // Plain http: the prefix is not allowed there, so the bare names.
    let http = KeyedPortal::start(&TestDb::Sqlite, PUBLIC_URL, "").await;
    let mut browser = Browser::new(&http.server);
    let page = browser.get(&http.server.url("/enroll")).await;
    let csrf = page.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(csrf.starts_with("tb_csrf="), "{csrf}");
    assert!(!csrf.contains("Secure"), "{csrf}");
    http.server.stop().await;
}

#[tokio::test]
async fn a_person_holds_a_bounded_number_of_unused_profiles() {
    for db in TestDb::all().await {
        let portal = KeyedPortal::start(&db, PUBLIC_URL, "").await;
        let server = &portal.server;
        let (mut browser, csrf) = portal.signed_in("gail").await;
        let mut challenges = Vec::new();
        for i in 0..5 {
            let response = post_download(server, &mut browser, &csrf).await;
            assert_eq!(
                response.status(),
                StatusCode::OK,
                "{}: download {i}",
                db.name()
            );
            challenges.push(challenge_in(&response.bytes().await.unwrap()));
        }
        // The sixth within the hour: 429, a page that says what to do, nothing made.
        let refused = post_download(server, &mut browser, &csrf).await;
        assert_eq!(
            refused.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            db.name()
        );
        assert_security_headers(&refused, "over the limit");
        let wait: i64 = refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3600).contains(&wait), "{wait}");
        let text = refused.text().await.unwrap();
        assert!(
            text.contains("already downloaded 5 enrollment profiles")
                && text.contains("Install one of those")
                && text.contains("minutes"),
            "{text}"
        );
        assert_eq!(portal.unredeemed_profiles("gail").await, 5);
        // Someone else is not affected.
        let (mut other, other_csrf) = portal.signed_in("hank").await;
        assert_eq!(
            post_download(server, &mut other, &other_csrf)
                .await
                .status(),
            StatusCode::OK
        );
        // A device uses one of the five: that frees a slot, for one more download.
        Device::enroll(server, &challenges[0]).await;
        assert_eq!(portal.unredeemed_profiles("gail").await, 4);
        let response = post_download(server, &mut browser, &csrf).await;
        assert_eq!(response.status(), StatusCode::OK, "{}", db.name());
        assert_eq!(
            post_download(server, &mut browser, &csrf).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        // The refusal is in the audit log under the person's name.
        let audit = server
            .get_json(
                "/api/v1/audit?actor=user:test:gail&action=enrollment-profile.create",
                Some(&portal.admin),
            )
            .await;
        let denied = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["outcome"] == "denied")
            .count();
        assert_eq!(denied, 2, "{audit}");

        // Many downloads at once (the same session in many tabs) cannot get past the limit
        // between the check and the write.
        let (sealed, csrf) = portal.session("ivy").await;
        let cookie = format!("{}={sealed}", portal.session_cookie());
        let mut downloads = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let client = Browser::new(server).client;
            let url = server.url("/enroll/profile");
            let (cookie, csrf) = (cookie.clone(), csrf.clone());
            downloads.spawn(async move {
                client
                    .post(url)
                    .header("cookie", cookie)
                    .form(&[("csrf", csrf)])
                    .send()
                    .await
                    .unwrap()
                    .status()
            });
        }
        let mut granted = 0;
        while let Some(status) = downloads.join_next().await {
            match status.unwrap() {
                StatusCode::OK => granted += 1,
                StatusCode::TOO_MANY_REQUESTS => {}
                other => panic!("{}: {other}", db.name()),
            }
        }
        let held = portal.unredeemed_profiles("ivy").await;
        assert!(
            granted <= 5 && held == granted,
            "{}: {granted} granted, {held} held",
            db.name()
        );
        portal.server.stop().await;
    }
}

#[tokio::test]
async fn the_sign_in_throttle_believes_forwarded_addresses_only_from_trusted_proxies() {
    let (Some(url), Some(ca)) = (
        peer_env("TRUSTBROKER_TEST_LDAP_URL"),
        peer_env("TRUSTBROKER_TEST_LDAP_CA"),
    ) else {
        return;
    };
    use trustbroker::enroll::throttle::PER_ADDRESS;
    let ldap = ldap_toml(&url, &ca, "brokerpw");
    // Failed sign-ins, each as another login, each claiming to come from `claimed(i)`.
    async fn fail_from(
        server: &TestServer,
        browser: &mut Browser,
        csrf: &str,
        logins: std::ops::Range<u32>,
        claimed: impl Fn(u32) -> String,
    ) -> Vec<StatusCode> {
        let mut statuses = Vec::new();
        for i in logins {
            let login = format!("nobody{i}");
            let from = claimed(i);
            let response = browser
                .post_form_with(
                    &server.url("/auth/ldap/ldap"),
                    &[("csrf", csrf), ("login", &login), ("password", "guess")],
                    &[("x-forwarded-for", &from)],
                )
                .await;
            statuses.push(response.status());
        }
        statuses
    }

    // Behind a trusted proxy (the test connects from 127.0.0.1): the address it reports.
    let toml = format!("trusted_proxies = [\"127.0.0.1\"]\n{ldap}");
    let (server, _) = portal_on(&TestDb::Sqlite, &toml).await;
    let mut browser = Browser::new(&server);
    let csrf = hidden_input(&browser.page(&server.url("/enroll")).await, "csrf");
    // The client prepends addresses of its own; the proxy appends the one it saw.
    let statuses = fail_from(&server, &mut browser, &csrf, 0..PER_ADDRESS, |i| {
        format!("10.9.{i}.1, 198.51.100.7")
    })
    .await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "{statuses:?}"
    );
    let blocked = fail_from(&server, &mut browser, &csrf, 100..101, |_| {
        "203.0.113.99, 198.51.100.7".into()
    })
    .await;
    assert_eq!(
        blocked,
        [StatusCode::TOO_MANY_REQUESTS],
        "that client is throttled"
    );
    let other = fail_from(&server, &mut browser, &csrf, 101..102, |_| {
        "198.51.100.8".into()
    })
    .await;
    assert_eq!(
        other,
        [StatusCode::UNAUTHORIZED],
        "another client behind the proxy is not"
    );
    // IPv6 clients count by /64: another address in the same /64 is the same client.
    let v6 = fail_from(&server, &mut browser, &csrf, 200..200 + PER_ADDRESS, |i| {
        format!("2001:db8:7:7::{i:x}")
    })
    .await;
    assert!(v6.iter().all(|s| *s == StatusCode::UNAUTHORIZED), "{v6:?}");
    let same_64 = fail_from(&server, &mut browser, &csrf, 300..301, |_| {
        "2001:db8:7:7:ffff::1".into()
    })
    .await;
    assert_eq!(same_64, [StatusCode::TOO_MANY_REQUESTS]);
    server.stop().await;

    // Not behind a trusted proxy: the header is the client's word and is ignored; the socket
    // address is throttled, whatever the header says.
    let toml = format!("trusted_proxies = [\"10.0.0.0/8\"]\n{ldap}");
    let (server, _) = portal_on(&TestDb::Sqlite, &toml).await;
    let mut browser = Browser::new(&server);
    let csrf = hidden_input(&browser.page(&server.url("/enroll")).await, "csrf");
    let statuses = fail_from(&server, &mut browser, &csrf, 0..PER_ADDRESS, |i| {
        format!("198.51.100.{i}")
    })
    .await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::UNAUTHORIZED),
        "{statuses:?}"
    );
    let blocked = fail_from(&server, &mut browser, &csrf, 100..101, |_| {
        "203.0.113.1".into()
    })
    .await;
    assert_eq!(blocked, [StatusCode::TOO_MANY_REQUESTS]);
    server.stop().await;
}
