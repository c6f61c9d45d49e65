//! The real peers that `tests/run.sh` starts are reachable from the suite: the harness that
//! later tests (LDAP, OIDC and SAML sign-in, SCEP interoperability) build on.

use std::process::Command;

use crate::harness::peer_env;

#[tokio::test]
async fn slapd_accepts_the_service_bind_and_refuses_a_wrong_password() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_LDAP_URL") else {
        return;
    };
    let (conn, mut ldap) = ldap3::LdapConnAsync::new(&url)
        .await
        .expect("connect to slapd");
    ldap3::drive!(conn);
    let service_dn = "cn=broker,ou=services,dc=example,dc=org";
    ldap.simple_bind(service_dn, "brokerpw")
        .await
        .unwrap()
        .success()
        .expect("service bind");
    let (entries, _) = ldap
        .search(
            "ou=people,dc=example,dc=org",
            ldap3::Scope::OneLevel,
            &format!("(uid={})", ldap3::ldap_escape("bob")),
            vec!["memberOf"],
        )
        .await
        .unwrap()
        .success()
        .unwrap();
    let bob = ldap3::SearchEntry::construct(entries.into_iter().next().expect("bob exists"));
    let groups = bob.attrs.get("memberOf").cloned().unwrap_or_default();
    assert!(
        groups.contains(&"cn=mdm-users,ou=groups,dc=example,dc=org".to_string()),
        "{groups:?}"
    );
    let wrong = ldap
        .simple_bind(service_dn, "not-the-password")
        .await
        .unwrap();
    assert_eq!(wrong.rc, 49, "invalidCredentials");
    ldap.unbind().await.unwrap();
}

#[tokio::test]
async fn oidc_provider_publishes_discovery() {
    let Some(issuer) = peer_env("TRUSTBROKER_TEST_OIDC_ISSUER") else {
        return;
    };
    let doc: serde_json::Value = reqwest::get(format!("{issuer}/.well-known/openid-configuration"))
        .await
        .expect("discovery")
        .json()
        .await
        .expect("JSON");
    assert_eq!(doc["issuer"], issuer.as_str());
    let methods = doc["code_challenge_methods_supported"].as_array().unwrap();
    assert!(methods.iter().any(|m| m == "S256"), "{doc:#}");
    assert!(doc["jwks_uri"].as_str().is_some());
}

#[tokio::test]
async fn saml_idp_publishes_signed_metadata_with_a_signing_certificate() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let xml = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(xml.contains("IDPSSODescriptor"), "{xml}");
    assert!(xml.contains("SingleSignOnService"));
    assert!(
        xml.contains("X509Certificate"),
        "metadata names a signing certificate"
    );
}

#[test]
fn scep_client_and_server_are_installed() {
    if peer_env("TRUSTBROKER_TEST_PEERS").is_none() {
        return;
    }
    for tool in ["scepclient", "scepserver"] {
        // Both print usage for -help; what matters is that the binary runs here.
        let out = Command::new(tool)
            .arg("-help")
            .output()
            .unwrap_or_else(|e| panic!("{tool} is not installed: {e}"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains("Usage") || text.contains("-"),
            "{tool}: {text}"
        );
    }
}
