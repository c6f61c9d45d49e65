//! LDAP sign-in against the seeded slapd that `tests/run.sh` starts (see tests/peers/ldap.sh):
//! StartTLS and LDAPS with the test CA, the service bind, user search, password bind, groups
//! from memberOf and from group searches, and each failure as `trustbroker idp test` reports it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use trustbroker::config::Secret;
use trustbroker::identity::ldap::{LdapProvider, LdapSettings};
use trustbroker::identity::{Group, Identity, IdpError};

use crate::harness::peer_env;

const SERVICE_DN: &str = "cn=broker,ou=services,dc=example,dc=org";
const REFUSED: &str = "sign-in refused: wrong login or password";
const GROUP_SEARCH: &str = "groups = \"search\"\ngroup_base = \"ou=groups,dc=example,dc=org\"\n";

/// Where slapd is; `None` (skip) under a bare `cargo test`.
struct Directory {
    /// ldap://127.0.0.1:3389 (StartTLS)
    url: String,
    /// ldaps://127.0.0.1:6636
    ldaps_url: String,
    ca: String,
}

fn directory() -> Option<Directory> {
    Some(Directory {
        url: peer_env("TRUSTBROKER_TEST_LDAP_URL")?,
        ldaps_url: peer_env("TRUSTBROKER_TEST_LDAPS_URL")?,
        ca: peer_env("TRUSTBROKER_TEST_LDAP_CA")?,
    })
}

/// Settings as an operator writes them: the service account and user base, plus `extra`.
fn settings(url: &str, extra: &str) -> LdapSettings {
    toml::from_str(&format!(
        "url = \"{url}\"\nbind_dn = \"{SERVICE_DN}\"\nbind_password = \"brokerpw\"\n\
         user_base = \"ou=people,dc=example,dc=org\"\n{extra}"
    ))
    .expect("settings parse")
}

fn provider(url: &str, extra: &str) -> LdapProvider {
    LdapProvider::new("corp", &settings(url, extra)).expect("provider")
}

impl Directory {
    /// StartTLS, trusting the test CA: the usual setup.
    fn starttls(&self, extra: &str) -> LdapProvider {
        provider(&self.url, &format!("ca_file = \"{}\"\n{extra}", self.ca))
    }

    /// A person's entryUUID, read directly with ldap3 (not through the code under test).
    async fn entry_uuid(&self, uid: &str) -> String {
        let (conn, mut ldap) = ldap3::LdapConnAsync::new(&self.url).await.expect("connect");
        ldap3::drive!(conn);
        ldap.simple_bind(SERVICE_DN, "brokerpw")
            .await
            .unwrap()
            .success()
            .unwrap();
        let (entries, _) = ldap
            .search(
                "ou=people,dc=example,dc=org",
                ldap3::Scope::OneLevel,
                &format!("(uid={uid})"),
                vec!["entryUUID"],
            )
            .await
            .unwrap()
            .success()
            .unwrap();
        let entry = ldap3::SearchEntry::construct(entries.into_iter().next().expect("entry"));
        let uuid = entry.attrs["entryUUID"][0].clone();
        assert_eq!(uuid.len(), 36, "{uuid}");
        uuid
    }
}

fn group(cn: &str) -> Group {
    Group {
        id: format!("cn={cn},ou=groups,dc=example,dc=org"),
        name: cn.into(),
    }
}

fn groups(cns: &[&str]) -> Vec<Group> {
    cns.iter().map(|cn| group(cn)).collect()
}

fn assert_refused(result: Result<Identity, IdpError>, what: &str) {
    match result {
        Err(e @ IdpError::Refused(_)) => assert_eq!(e.to_string(), REFUSED, "{what}"),
        other => panic!("{what}: expected Refused, got {other:?}"),
    }
}

#[tokio::test]
async fn ldap_signs_bob_in_with_mail_display_name_and_member_of_groups() {
    let Some(dir) = directory() else { return };
    let ldap = dir.starttls("");
    let bob = ldap
        .authenticate("bob", "bobpw")
        .await
        .expect("bob signs in");
    assert_eq!(
        bob,
        Identity {
            provider: "corp".into(),
            subject: dir.entry_uuid("bob").await,
            login: Some("bob".into()),
            email: Some("bob@example.org".into()),
            display_name: Some("Bob Brown".into()),
            groups: groups(&["mdm-users", "staff"]),
        }
    );
    // The login reported is the directory's, whatever case was typed; the subject is stable.
    let again = ldap
        .authenticate("BOB", "bobpw")
        .await
        .expect("case-insensitive uid");
    assert_eq!(again, bob);
    // Both searches ran, one after the other, on the same pooled service connection.
    assert_eq!(ldap.idle_connections(), 1);
}

#[tokio::test]
async fn ldap_reads_alice_groups_by_search_including_group_of_unique_names() {
    let Some(dir) = directory() else { return };
    let alice = dir
        .starttls(GROUP_SEARCH)
        .authenticate("alice", "alicepw")
        .await
        .expect("alice signs in");
    assert_eq!(alice.groups, groups(&["admins", "staff", "vpn-users"]));
    assert_eq!(alice.display_name.as_deref(), Some("Alice Anderson"));
    assert_eq!(alice.subject, dir.entry_uuid("alice").await);
    // memberOf only knows groupOfNames: vpn-users is missing that way.
    let by_member_of = dir
        .starttls("")
        .authenticate("alice", "alicepw")
        .await
        .unwrap();
    assert_eq!(by_member_of.groups, groups(&["admins", "staff"]));
}

#[tokio::test]
async fn ldap_reads_carol_groups_by_search_including_posix_member_uid() {
    let Some(dir) = directory() else { return };
    let carol = dir
        .starttls(GROUP_SEARCH)
        .authenticate("carol", "carolpw")
        .await
        .expect("carol signs in");
    assert_eq!(carol.groups, groups(&["developers", "mdm-users", "staff"]));
    // memberUid holds the directory's uid: typed in another case, carol keeps her groups.
    let upper = dir
        .starttls(GROUP_SEARCH)
        .authenticate("CAROL", "carolpw")
        .await
        .unwrap();
    assert_eq!(upper.groups, carol.groups);
    // groups = "none" reads none.
    let none = dir
        .starttls("groups = \"none\"")
        .authenticate("carol", "carolpw")
        .await
        .unwrap();
    assert_eq!(none.groups, []);
}

#[tokio::test]
async fn ldap_refuses_a_wrong_password_and_an_unknown_user_alike() {
    let Some(dir) = directory() else { return };
    let ldap = dir.starttls("");
    assert_refused(ldap.authenticate("bob", "wrong").await, "wrong password");
    assert_refused(
        ldap.authenticate("bob", "alicepw").await,
        "alice's password",
    );
    assert_refused(ldap.authenticate("mallory", "bobpw").await, "unknown user");
    assert_refused(ldap.authenticate("bob", "").await, "empty password");
    assert_refused(ldap.authenticate("", "").await, "empty login");
    // The service account is not a person: it is outside user_base and not an inetOrgPerson.
    assert_refused(
        ldap.authenticate("broker", "brokerpw").await,
        "service account",
    );
}

#[tokio::test]
async fn ldap_refuses_filter_injection_logins() {
    let Some(dir) = directory() else { return };
    let ldap = dir.starttls(GROUP_SEARCH);
    let logins = [
        "*",
        "b*",
        "bob)(uid=*",
        "*)(|(uid=*",
        "bob)(|(objectClass=*",
        "*)(uid=*))(|(uid=*",
        "bob\\",
        "bob\\2a",
    ];
    for login in logins {
        for password in ["bobpw", "alicepw", "carolpw", "brokerpw"] {
            assert_refused(
                ldap.authenticate(login, password).await,
                &format!("{login:?} / {password}"),
            );
        }
    }
}

#[tokio::test]
async fn ldap_refuses_a_login_that_matches_several_entries() {
    let Some(dir) = directory() else { return };
    // A careless filter that matches everyone: even bob's right password must not pick one.
    let ldap = dir.starttls("user_filter = \"(|(uid={login})(objectClass=inetOrgPerson))\"");
    assert_refused(ldap.authenticate("bob", "bobpw").await, "several entries");
}

#[tokio::test]
async fn ldaps_with_the_test_ca_signs_in_and_checks() {
    let Some(dir) = directory() else { return };
    let ldap = provider(&dir.ldaps_url, &format!("ca_file = \"{}\"", dir.ca));
    let bob = ldap
        .authenticate("bob", "bobpw")
        .await
        .expect("bob over LDAPS");
    assert_eq!(bob.groups, groups(&["mdm-users", "staff"]));
    assert_eq!(
        ldap.check().await.expect("check"),
        [
            format!(
                "connected to {} (LDAPS; the server's certificate verified against ca_file {})",
                dir.ldaps_url, dir.ca
            ),
            format!("service bind as {SERVICE_DN} accepted"),
            "user base ou=people,dc=example,dc=org found; user_filter \
             (&(objectClass=inetOrgPerson)(uid={login})) matches 3 entries"
                .to_string(),
        ]
    );
}

#[tokio::test]
async fn starttls_check_reports_each_step() {
    let Some(dir) = directory() else { return };
    let lines = dir.starttls(GROUP_SEARCH).check().await.expect("check");
    assert_eq!(
        lines,
        [
            format!(
                "connected to {} (StartTLS; the server's certificate verified against ca_file {})",
                dir.url, dir.ca
            ),
            format!("service bind as {SERVICE_DN} accepted"),
            "user base ou=people,dc=example,dc=org found; user_filter \
             (&(objectClass=inetOrgPerson)(uid={login})) matches 3 entries"
                .to_string(),
            "group base ou=groups,dc=example,dc=org found; group_filter matches 5 entries"
                .to_string(),
        ]
    );
}

#[tokio::test]
async fn tls_without_the_test_ca_fails_as_an_unknown_ca() {
    let Some(dir) = directory() else { return };
    // Without ca_file only the system's CAs are trusted, and none signed slapd's certificate.
    for url in [&dir.url, &dir.ldaps_url] {
        let ldap = provider(url, "");
        let expected = format!(
            "TLS with the identity provider failed: {url}: the server's certificate is signed \
             by an unknown CA (set ca_file to the CA that issued it)"
        );
        match ldap.authenticate("bob", "bobpw").await {
            Err(e @ IdpError::Tls(_)) => assert_eq!(e.to_string(), expected),
            other => panic!("{url}: expected Tls, got {other:?}"),
        }
        match ldap.check().await {
            Err(e @ IdpError::Tls(_)) => assert_eq!(e.to_string(), expected),
            other => panic!("{url}: expected Tls, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_wrong_service_password_is_misconfigured() {
    let Some(dir) = directory() else { return };
    let mut s = settings(&dir.url, &format!("ca_file = \"{}\"", dir.ca));
    s.bind_password = Some(Secret("not-brokerpw".into()));
    let ldap = LdapProvider::new("corp", &s).unwrap();
    let expected = format!(
        "the identity provider is misconfigured: the service bind as {SERVICE_DN} was refused: \
         wrong bind_dn or bind_password (invalidCredentials)"
    );
    match ldap.authenticate("bob", "bobpw").await {
        Err(e @ IdpError::Misconfigured(_)) => assert_eq!(e.to_string(), expected),
        other => panic!("expected Misconfigured, got {other:?}"),
    }
    match ldap.check().await {
        Err(e @ IdpError::Misconfigured(_)) => assert_eq!(e.to_string(), expected),
        other => panic!("expected Misconfigured, got {other:?}"),
    }
    assert_eq!(ldap.idle_connections(), 0, "a refused bind is not pooled");
}

#[tokio::test]
async fn a_missing_user_base_is_misconfigured() {
    let Some(dir) = directory() else { return };
    let mut s = settings(&dir.url, &format!("ca_file = \"{}\"", dir.ca));
    s.user_base = Some("ou=nobody,dc=example,dc=org".into());
    let ldap = LdapProvider::new("corp", &s).unwrap();
    let expected = "the identity provider is misconfigured: user_base \
                    ou=nobody,dc=example,dc=org does not exist (noSuchObject)";
    match ldap.check().await {
        Err(e @ IdpError::Misconfigured(_)) => assert_eq!(e.to_string(), expected),
        other => panic!("expected Misconfigured, got {other:?}"),
    }
    match ldap.authenticate("bob", "bobpw").await {
        Err(e @ IdpError::Misconfigured(_)) => assert_eq!(e.to_string(), expected),
        other => panic!("expected Misconfigured, got {other:?}"),
    }
}

#[tokio::test]
async fn a_closed_port_is_unreachable_at_once() {
    if directory().is_none() {
        return;
    }
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("ldap://127.0.0.1:{port}");
    let ldap = provider(&url, "");
    let started = Instant::now();
    match ldap.authenticate("bob", "bobpw").await {
        Err(IdpError::Unreachable(m)) => {
            assert!(m.starts_with(&format!("{url}: connecting: ")), "{m}")
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
    assert!(matches!(ldap.check().await, Err(IdpError::Unreachable(_))));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_silent_server_is_unreachable_within_the_timeouts() {
    if directory().is_none() {
        return;
    }
    // Accepts connections and never answers: StartTLS waits for a reply that never comes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ldap://{}", listener.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let ldap = provider(&url, "connect_timeout_secs = 1");
    let started = Instant::now();
    match ldap.authenticate("bob", "bobpw").await {
        Err(e @ IdpError::Unreachable(_)) => assert_eq!(
            e.to_string(),
            format!("the identity provider cannot be reached: {url}: no connection within 1 s")
        ),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    // In the clear, connecting succeeds at once and the service bind waits: the operation
    // timeout applies.
    let ldap = provider(
        &url,
        "starttls = false
timeout_secs = 1",
    );
    let started = Instant::now();
    match ldap.authenticate("bob", "bobpw").await {
        Err(e @ IdpError::Unreachable(_)) => assert_eq!(
            e.to_string(),
            format!(
                "the identity provider cannot be reached: {url}: no answer while binding as the \
                 service account within 1 s"
            )
        ),
        other => panic!("expected Unreachable, got {other:?}"),
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sign_ins_share_a_small_pool() {
    let Some(dir) = directory() else { return };
    let ldap = Arc::new(dir.starttls(&format!("pool_size = 3\n{GROUP_SEARCH}")));
    let people = [
        (
            "alice",
            "alicepw",
            Some(groups(&["admins", "staff", "vpn-users"])),
        ),
        ("bob", "bobpw", Some(groups(&["mdm-users", "staff"]))),
        (
            "carol",
            "carolpw",
            Some(groups(&["developers", "mdm-users", "staff"])),
        ),
        ("bob", "alicepw", None),
    ];
    for round in 0..2 {
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let ldap = ldap.clone();
                let (login, password, expected) = people[i % people.len()].clone();
                tokio::spawn(async move {
                    let result = ldap.authenticate(login, password).await;
                    (login, password, expected, result)
                })
            })
            .collect();
        for task in tasks {
            let (login, password, expected, result) = task.await.unwrap();
            match expected {
                Some(expected) => {
                    let identity = result.unwrap_or_else(|e| panic!("{login}: {e}"));
                    assert_eq!(identity.login.as_deref(), Some(login));
                    assert_eq!(identity.groups, expected, "{login}");
                }
                None => assert_refused(result, &format!("round {round}: {login}/{password}")),
            }
        }
        let idle = ldap.idle_connections();
        assert!(
            (1..=3).contains(&idle),
            "round {round}: {idle} idle connections"
        );
    }
}

#[tokio::test]
async fn plain_ldap_works_on_loopback_only_when_asked_for() {
    let Some(dir) = directory() else { return };
    let ldap = provider(&dir.url, "starttls = false");
    let bob = ldap
        .authenticate("bob", "bobpw")
        .await
        .expect("bob in the clear");
    assert_eq!(bob.email.as_deref(), Some("bob@example.org"));
    let lines = ldap.check().await.unwrap();
    assert_eq!(
        lines[0],
        format!(
            "connected to {} WITHOUT TLS (starttls = false, loopback only)",
            dir.url
        )
    );
}

#[tokio::test]
async fn the_subject_attribute_is_configurable_and_falls_back_to_the_dn() {
    let Some(dir) = directory() else { return };
    let numbered = dir
        .starttls("subject_attribute = \"employeeNumber\"")
        .authenticate("bob", "bobpw")
        .await
        .unwrap();
    assert_eq!(numbered.subject, "1002");
    // bob has no description: the DN stands in.
    let by_dn = dir
        .starttls("subject_attribute = \"description\"")
        .authenticate("bob", "bobpw")
        .await
        .unwrap();
    assert_eq!(by_dn.subject, "uid=bob,ou=people,dc=example,dc=org");
    let custom = dir
        .starttls("display_name_attribute = \"givenName\"\nmail_attribute = \"sn\"")
        .authenticate("bob", "bobpw")
        .await
        .unwrap();
    assert_eq!(custom.display_name.as_deref(), Some("Bob"));
    assert_eq!(custom.email.as_deref(), Some("Brown"));
}

/// A loopback TCP relay to slapd whose connections can all be cut at once, as an idle timeout
/// or a server restart would.
struct Relay {
    addr: std::net::SocketAddr,
    links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn to(target: &str) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let target = target.to_string();
        let accept = tokio::spawn({
            let links = links.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let target = target.clone();
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().unwrap().push(link);
                }
            }
        });
        Relay {
            addr,
            links,
            accept,
        }
    }

    fn cut(&self) {
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn pooled_connections_the_server_closed_are_replaced() {
    let Some(dir) = directory() else { return };
    let target = dir.url.trim_start_matches("ldap://").to_string();
    let relay = Relay::to(&target).await;
    let ldap = provider(
        &format!("ldap://{}", relay.addr),
        &format!("ca_file = \"{}\"", dir.ca),
    );
    let first = ldap
        .authenticate("bob", "bobpw")
        .await
        .expect("first sign-in");
    assert_eq!(ldap.idle_connections(), 1);
    relay.cut();
    let second = ldap
        .authenticate("bob", "bobpw")
        .await
        .expect("a sign-in after the server closed the pooled connection");
    assert_eq!(second, first);
    assert_eq!(ldap.idle_connections(), 1);
}

#[tokio::test]
async fn each_password_is_checked_on_a_connection_of_its_own() {
    let Some(dir) = directory() else { return };
    let target = dir.url.trim_start_matches("ldap://").to_string();
    let relay = Relay::to(&target).await;
    let ldap = provider(
        &format!("ldap://{}", relay.addr),
        &format!("ca_file = \"{}\"", dir.ca),
    );
    let connections = || relay.links.lock().unwrap().len();
    ldap.authenticate("bob", "bobpw").await.unwrap();
    // One pooled service connection, one for bob's bind.
    assert_eq!(connections(), 2);
    ldap.authenticate("alice", "wrong").await.unwrap_err();
    ldap.authenticate("carol", "carolpw").await.unwrap();
    // The pooled connection was reused; each password bind had a new one.
    assert_eq!(connections(), 4);
    assert_eq!(ldap.idle_connections(), 1);
    // An unknown login costs a (decoy) password bind too: timing does not tell who exists.
    let refused = ldap.authenticate("nobody", "whatever").await.unwrap_err();
    assert_eq!(refused.to_string(), REFUSED);
    assert_eq!(connections(), 5);
}
