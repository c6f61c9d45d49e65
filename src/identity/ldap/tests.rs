//! Settings validation and identity mapping; the directory itself is exercised in
//! `tests/it/ldap.rs` against slapd.

use super::*;

const BASE: &str = r#"
bind_dn = "cn=broker,ou=services,dc=example,dc=org"
bind_password = "brokerpw"
user_base = "ou=people,dc=example,dc=org"
"#;

fn settings(extra: &str) -> LdapSettings {
    toml::from_str(&format!("{BASE}{extra}")).expect("settings parse")
}

fn error(extra: &str) -> String {
    match LdapProvider::new("corp", &settings(extra)) {
        Ok(_) => panic!("accepted: {extra}"),
        Err(IdpError::Misconfigured(m)) => m,
        Err(other) => panic!("not Misconfigured: {other:?}"),
    }
}

#[test]
fn defaults_are_secure_and_documented() {
    let s = settings("url = \"ldap://ldap.example.org\"\n");
    assert_eq!(s.starttls, None);
    assert_eq!(s.user_filter, "(&(objectClass=inetOrgPerson)(uid={login}))");
    assert_eq!(s.login_attribute, "uid");
    assert_eq!(s.mail_attribute, "mail");
    assert_eq!(s.display_name_attribute, "cn");
    assert_eq!(s.subject_attribute, "entryUUID");
    assert_eq!(s.groups, GroupSource::MemberOf);
    assert_eq!(s.member_of_attribute, "memberOf");
    assert_eq!(s.group_name_attribute, "cn");
    assert_eq!(s.connect_timeout_secs, 5);
    assert_eq!(s.timeout_secs, 5);
    assert_eq!(s.pool_size, 4);
    let p = LdapProvider::new("corp", &s).unwrap();
    assert_eq!(p.endpoint.transport, Transport::StartTls);
    assert_eq!(p.endpoint.url, "ldap://ldap.example.org");
    assert_eq!(p.endpoint.host, "ldap.example.org");
    assert!(p.endpoint.tls.is_none(), "system roots without ca_file");
    assert_eq!(p.endpoint.connect_timeout, Duration::from_secs(5));
    assert_eq!(p.pool.size(), 4);
    // The password never shows in Debug output.
    assert!(!format!("{s:?}").contains("brokerpw"));
    assert!(!format!("{p:?}").contains("brokerpw"));
}

#[test]
fn plain_ldap_needs_an_explicit_opt_out_and_a_loopback_host() {
    let starttls = |url: &str, extra: &str| {
        LdapProvider::new("corp", &settings(&format!("url = \"{url}\"\n{extra}")))
            .map(|p| p.endpoint.transport)
    };
    assert_eq!(
        starttls("ldap://127.0.0.1:3389", "").unwrap(),
        Transport::StartTls
    );
    assert_eq!(
        starttls("ldap://127.0.0.1:3389", "starttls = true").unwrap(),
        Transport::StartTls
    );
    for host in ["127.0.0.1:3389", "127.1.2.3", "localhost", "[::1]:389"] {
        assert_eq!(
            starttls(&format!("ldap://{host}"), "starttls = false").unwrap(),
            Transport::Plain,
            "{host}"
        );
    }
    assert_eq!(
        error("url = \"ldap://ldap.example.org\"\nstarttls = false"),
        "idp.corp: starttls = false would send passwords in the clear to ldap.example.org: it is \
         allowed only for a loopback address; use StartTLS or ldaps://"
    );
    assert!(
        error("url = \"ldap://10.0.0.1\"\nstarttls = false").contains("in the clear to 10.0.0.1")
    );
    assert!(
        error("url = \"ldap://localhost.example.org\"\nstarttls = false").contains("in the clear")
    );
    assert_eq!(
        starttls("ldaps://ldap.example.org", "").unwrap(),
        Transport::Ldaps
    );
    assert_eq!(
        error("url = \"ldaps://ldap.example.org\"\nstarttls = true"),
        "idp.corp: starttls = true does not apply to ldaps:// (TLS from the start)"
    );
    assert_eq!(
        error("url = \"ldap://127.0.0.1\"\nstarttls = false\nca_file = \"/x.pem\""),
        "idp.corp: ca_file has no use with starttls = false"
    );
}

#[test]
fn urls_are_strict() {
    assert_eq!(
        error("url = \"http://ldap.example.org\""),
        "idp.corp: url \"http://ldap.example.org\" must start with ldap:// or ldaps://"
    );
    assert_eq!(
        error("url = \"ldap://u:p@ldap.example.org\""),
        "idp.corp: url must not hold credentials: use bind_dn and bind_password"
    );
    assert!(
        error("url = \"ldap://ldap.example.org/dc=example,dc=org\"").contains("host[:port] only")
    );
    assert!(error("url = \"ldap://ldap.example.org/??sub\"").contains("host[:port] only"));
    assert_eq!(
        error("url = \"ldap:///\""),
        "idp.corp: url \"ldap:///\" names no host"
    );
    assert!(error("url = \"not a url\"").starts_with("idp.corp: url \"not a url\": "));
    let p = LdapProvider::new(
        "corp",
        &settings("url = \"ldaps://LDAP.example.org:6636/\""),
    )
    .unwrap();
    assert_eq!(p.endpoint.url, "ldaps://ldap.example.org:6636");
}

#[test]
fn required_keys_and_ranges_are_checked() {
    let url = "url = \"ldaps://ldap.example.org\"\n";
    let mut only_url = settings(url);
    only_url.bind_dn = None;
    let err = LdapProvider::new("corp", &only_url)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "the identity provider is misconfigured: idp.corp: bind_dn is required"
    );
    let mut s = settings(url);
    s.bind_password = Some(Secret(String::new()));
    assert!(matches!(
        LdapProvider::new("corp", &s),
        Err(IdpError::Misconfigured(m)) if m == "idp.corp: bind_password is required"
    ));
    let mut s = settings(url);
    s.user_base = Some("  ".into());
    assert!(matches!(
        LdapProvider::new("corp", &s),
        Err(IdpError::Misconfigured(m)) if m == "idp.corp: user_base is required"
    ));
    assert_eq!(
        error(&format!("{url}timeout_secs = 0")),
        "idp.corp: timeout_secs must be 1–300 seconds, not 0"
    );
    assert_eq!(
        error(&format!("{url}connect_timeout_secs = 301")),
        "idp.corp: connect_timeout_secs must be 1–300 seconds, not 301"
    );
    assert_eq!(
        error(&format!("{url}pool_size = 0")),
        "idp.corp: pool_size must be 1–64, not 0"
    );
    assert_eq!(
        error(&format!("{url}mail_attribute = \"mail)(x\"")),
        "idp.corp: mail_attribute \"mail)(x\" is not an attribute name"
    );
    assert_eq!(
        error(&format!("{url}user_filter = \"(uid=*)\"")),
        "idp.corp: user_filter \"(uid=*)\": it uses none of {login}"
    );
    assert_eq!(
        error(&format!("{url}groups = \"search\"")),
        "idp.corp: group_base (with groups = \"search\") is required"
    );
    assert_eq!(
        error(&format!(
            "{url}groups = \"search\"\ngroup_base = \"ou=groups\"\ngroup_filter = \"(member={{user}})\""
        )),
        "idp.corp: group_filter \"(member={user})\": unknown placeholder {user} (allowed: {dn}, {login})"
    );
    let bad_ca = error(&format!("{url}ca_file = \"/nonexistent/ca.pem\""));
    assert!(
        bad_ca.starts_with("idp.corp: ca_file /nonexistent/ca.pem: "),
        "{bad_ca}"
    );
}

#[test]
fn unknown_keys_and_values_are_refused() {
    let misspelt =
        toml::from_str::<LdapSettings>(&format!("{BASE}url = \"ldaps://h\"\nuser_fliter = \"x\""));
    assert!(misspelt.is_err());
    let bad_source = toml::from_str::<LdapSettings>(&format!(
        "{BASE}url = \"ldaps://h\"\ngroups = \"memberof\""
    ));
    assert!(bad_source.is_err());
    let s = settings("url = \"ldaps://h\"\ngroups = \"none\"\n");
    assert_eq!(s.groups, GroupSource::Disabled);
}

#[test]
fn a_ca_file_without_certificates_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.pem");
    std::fs::write(&path, "not a certificate\n").unwrap();
    let err = error(&format!(
        "url = \"ldaps://h\"\nca_file = \"{}\"",
        path.display()
    ));
    assert_eq!(
        err,
        format!(
            "idp.corp: ca_file {}: holds no PEM certificate",
            path.display()
        )
    );
}

#[test]
fn logins_worth_a_search() {
    assert!(plausible_login("bob"));
    assert!(
        plausible_login("bob)(uid=*"),
        "escaped, not refused up front"
    );
    assert!(plausible_login("zoë"));
    assert!(!plausible_login(""));
    assert!(!plausible_login("   "));
    assert!(!plausible_login("bob\0"));
    assert!(!plausible_login("bob\n"));
    assert!(!plausible_login(&"a".repeat(257)));
}

#[tokio::test]
async fn empty_passwords_and_blank_logins_are_refused_without_a_connection() {
    // Port 9 on loopback (discard) is closed here; reaching it would be Unreachable, not Refused.
    let p = LdapProvider::new("corp", &settings("url = \"ldaps://127.0.0.1:9\"")).unwrap();
    for (login, password) in [("bob", ""), ("", "bobpw"), ("bob\0", "bobpw")] {
        let err = p.authenticate(login, password).await.unwrap_err();
        assert_eq!(err.to_string(), "sign-in refused: wrong login or password");
    }
}

#[test]
fn subjects_fall_back_from_text_to_hex_to_the_dn() {
    let p = LdapProvider::new(
        "corp",
        &settings("url = \"ldaps://h\"\nsubject_attribute = \"objectGUID\""),
    )
    .unwrap();
    let text = Entry::new("uid=a,dc=x", &[("objectguid", &[b"abc"])]);
    assert_eq!(p.subject_of(&text), "abc");
    let binary = Entry::new("uid=a,dc=x", &[("objectGUID", &[&[0x01, 0xab, 0xff]])]);
    assert_eq!(p.subject_of(&binary), "01abff");
    let none = Entry::new("uid=a,dc=x", &[]);
    assert_eq!(p.subject_of(&none), "uid=a,dc=x");
}

#[tokio::test]
async fn member_of_groups_are_named_by_rdn_sorted_and_deduplicated() {
    let p = LdapProvider::new("corp", &settings("url = \"ldaps://h\"")).unwrap();
    let user = Entry::new(
        "uid=bob,ou=people",
        &[(
            "memberof",
            &[
                b"cn=staff,ou=groups,dc=example,dc=org",
                b"cn=mdm-users,ou=groups,dc=example,dc=org",
                b"cn=staff,ou=groups,dc=example,dc=org",
            ],
        )],
    );
    let groups = p.groups_of(&user, "bob").await.unwrap();
    assert_eq!(
        groups,
        [
            Group {
                id: "cn=mdm-users,ou=groups,dc=example,dc=org".into(),
                name: "mdm-users".into()
            },
            Group {
                id: "cn=staff,ou=groups,dc=example,dc=org".into(),
                name: "staff".into()
            },
        ]
    );
}

#[test]
fn sign_in_futures_are_send() {
    fn send<T: Send>(_: &T) {}
    let p = LdapProvider::new("corp", &settings("url = \"ldaps://h\"")).unwrap();
    send(&p.authenticate("a", "b"));
    send(&p.check());
    fn sync<T: Send + Sync>(_: &T) {}
    sync(&p);
}
