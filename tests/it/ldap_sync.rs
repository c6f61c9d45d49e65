//! LDAP group sync against slapd (see tests/peers/ldap.sh), on SQLite and PostgreSQL: joins and
//! leaves written as deltas with a reconcile request each, disabled and deleted accounts, a
//! group larger than a page, group entries read with `groups = "search"`, and the loop.
//!
//! Each test works in an organizational unit of its own (`ou=sync-<random>,dc=example,dc=org`,
//! the provider's `user_base`, removed afterwards), so tests run concurrently and repeatedly
//! against the same slapd.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use trustbroker::identity::Identity;
use trustbroker::identity::ldap::sync::{GroupSync, SOURCE, SyncError};
use trustbroker::identity::ldap::{LdapProvider, LdapSettings};
use trustbroker::policy::{
    Active, ActivePolicies, GroupRef, OnLeave, Policy, PolicySet, ReconcileWake,
};
use trustbroker::store::{AccountStatus, Store};

use crate::harness::{TestDb, peer_env};

const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
const ADMIN_PW: &str = "adminpw";
const SERVICE_DN: &str = "cn=broker,ou=services,dc=example,dc=org";

/// A fresh organizational unit holding this test's people and groups.
pub struct Sandbox {
    pub url: String,
    pub ca: String,
    /// `ou=sync-…,dc=example,dc=org`
    pub base: String,
}

impl Sandbox {
    /// `None` (skip) under a bare `cargo test`.
    pub fn new() -> Option<Sandbox> {
        let url = peer_env("TRUSTBROKER_TEST_LDAP_URL")?;
        let ca = peer_env("TRUSTBROKER_TEST_LDAP_CA")?;
        let name = format!("sync-{}", uuid::Uuid::new_v4().simple());
        let sandbox = Sandbox {
            url,
            ca,
            base: format!("ou={name},dc=example,dc=org"),
        };
        sandbox.ldapadd(&format!(
            "dn: {}\nobjectClass: organizationalUnit\nou: {name}\n",
            sandbox.base
        ));
        Some(sandbox)
    }

    pub fn dn(&self, rdn: &str) -> String {
        format!("{rdn},{}", self.base)
    }

    /// A person `uid` with password `<uid>pw`.
    pub fn person(&self, uid: &str) -> String {
        format!(
            "dn: {}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid} Test\nsn: Test\n\
             mail: {uid}@example.org\nuserPassword: {uid}pw\n\n",
            self.dn(&format!("uid={uid}"))
        )
    }

    pub fn group_of_names(&self, cn: &str, members: &[&str]) -> String {
        let mut ldif = format!(
            "dn: {}\nobjectClass: groupOfNames\ncn: {cn}\n",
            self.dn(&format!("cn={cn}"))
        );
        for uid in members {
            ldif.push_str(&format!("member: {}\n", self.dn(&format!("uid={uid}"))));
        }
        ldif.push('\n');
        ldif
    }

    pub fn ldapadd(&self, ldif: &str) {
        self.ldap_tool("ldapadd", &[], ldif);
    }

    pub fn ldapmodify(&self, ldif: &str) {
        self.ldap_tool("ldapmodify", &[], ldif);
    }

    fn ldap_tool(&self, tool: &str, args: &[&str], ldif: &str) {
        let mut child = Command::new(tool)
            .args(["-x", "-H", &self.url, "-D", ADMIN_DN, "-w", ADMIN_PW])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ldif.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}\n{ldif}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Settings as an operator writes them, with this sandbox as `user_base`, plus `extra`.
    pub fn settings(&self, bind_dn: &str, bind_password: &str, extra: &str) -> LdapSettings {
        toml::from_str(&format!(
            "url = \"{}\"\nca_file = \"{}\"\nbind_dn = \"{bind_dn}\"\n\
             bind_password = \"{bind_password}\"\nuser_base = \"{}\"\n\
             group_sync_interval_secs = 1\n{extra}",
            self.url, self.ca, self.base
        ))
        .expect("settings parse")
    }

    pub fn provider(&self, extra: &str) -> Arc<LdapProvider> {
        Arc::new(LdapProvider::new("corp", &self.settings(SERVICE_DN, "brokerpw", extra)).unwrap())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("ldapdelete")
            .args([
                "-x", "-H", &self.url, "-D", ADMIN_DN, "-w", ADMIN_PW, "-r", &self.base,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

async fn open(db: &TestDb, dir: &tempfile::TempDir) -> Store {
    let store = match db {
        TestDb::Sqlite => Store::open_sqlite(&dir.path().join("t.db"), 4)
            .await
            .unwrap(),
        TestDb::Postgres(pg) => Store::open_postgres(&pg.url, 4).await.unwrap(),
    };
    store.migrate().await.unwrap();
    store
}

/// A real sign-in, recorded as the portal records it.
async fn sign_in(store: &Store, provider: &LdapProvider, uid: &str) -> String {
    let identity = provider
        .authenticate(uid, &format!("{uid}pw"))
        .await
        .unwrap_or_else(|e| panic!("{uid} signs in: {e}"));
    store.record_sign_in(&identity, "sign-in").await.unwrap().id
}

/// The reconcile requests recorded since the last call, as (user ID, reason), sorted.
async fn requests(store: &Store) -> Vec<(String, String)> {
    let now = chrono::Utc::now().timestamp_millis();
    let claimed = store
        .claim_reconcile_requests(100_000, "test", now, now + 600_000)
        .await
        .unwrap();
    let ids: Vec<i64> = claimed.iter().map(|r| r.id).collect();
    store.finish_reconcile_requests(&ids).await.unwrap();
    let mut out: Vec<_> = claimed
        .into_iter()
        .map(|r| (r.user_id.unwrap_or_default(), r.reason))
        .collect();
    out.sort();
    out
}

/// `user_id`'s memberships in `group` as (source, last_seen_at).
async fn membership(store: &Store, user_id: &str, group: &str) -> Option<(String, String)> {
    store
        .memberships(user_id)
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.external_id == group)
        .map(|m| (m.source, m.last_seen_at.to_rfc3339()))
}

async fn status_of(store: &Store, subject_login: &str) -> AccountStatus {
    store
        .directory_users("corp")
        .await
        .unwrap()
        .into_iter()
        .find(|u| u.login.as_deref() == Some(subject_login))
        .unwrap_or_else(|| panic!("{subject_login} is known"))
        .status
}

#[tokio::test]
async fn ldap_sync_records_joins_and_leaves_as_deltas_with_a_reconcile_request_each() {
    for db in TestDb::all().await {
        let Some(ldap) = Sandbox::new() else { return };
        let name = db.name();
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db, &dir).await;
        ldap.ldapadd(&format!(
            "{}{}{}",
            ldap.person("dana"),
            ldap.person("erik"),
            ldap.group_of_names("eng", &["erik"])
        ));
        let eng = ldap.dn("cn=eng");
        let eng_only = vec![eng.clone()];
        let provider = ldap.provider("");
        let dana = sign_in(&store, &provider, "dana").await;
        requests(&store).await;
        let sync = GroupSync::new(provider);

        // Erik is a member but never signed in: read, not stored.
        let report = sync.run_once(&store, &eng_only).await.unwrap();
        assert_eq!(
            (
                report.members_seen,
                report.joined,
                report.left,
                report.requests
            ),
            (1, 0, 0, 0),
            "{name}: {report:?}"
        );
        assert_eq!(
            store.list_users(None, 100).await.unwrap().len(),
            1,
            "{name}"
        );
        assert!(
            store.list_groups().await.unwrap().is_empty(),
            "{name}: no empty group row"
        );
        assert_eq!(requests(&store).await, [], "{name}");

        ldap.ldapmodify(&format!(
            "dn: {eng}\nchangetype: modify\nadd: member\nmember: {}\n",
            ldap.dn("uid=dana")
        ));
        let report = sync.run_once(&store, &eng_only).await.unwrap();
        assert_eq!(
            (
                report.members_seen,
                report.joined,
                report.left,
                report.requests
            ),
            (2, 1, 0, 1),
            "{name}: {report:?}"
        );
        let (source, seen_at) = membership(&store, &dana, &eng).await.expect("dana joined");
        assert_eq!(source, SOURCE, "{name}");
        assert_eq!(
            requests(&store).await,
            [(dana.clone(), format!("ldap-sync: joined {eng}"))],
            "{name}"
        );
        // The group is known now, so a run over the store's groups includes it.
        assert_eq!(
            sync.groups_to_sync(&store, &ActivePolicies::default())
                .await
                .unwrap(),
            eng_only,
            "{name}"
        );

        // Nothing changed in the directory: nothing is written, not even last_seen_at.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let report = sync.run_once(&store, &eng_only).await.unwrap();
        assert_eq!(
            (
                report.joined,
                report.left,
                report.requests,
                report.details_changed
            ),
            (0, 0, 0, 0),
            "{name}: {report:?}"
        );
        assert_eq!(requests(&store).await, [], "{name}");
        assert_eq!(
            membership(&store, &dana, &eng).await,
            Some((SOURCE.to_string(), seen_at)),
            "{name}: the unchanged row is not rewritten"
        );

        // A new e-mail address in the directory reaches the store (policies may use it).
        ldap.ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nreplace: mail\nmail: dana@new.example.org\n",
            ldap.dn("uid=dana")
        ));
        let report = sync.run_once(&store, &eng_only).await.unwrap();
        assert_eq!(
            (report.joined, report.details_changed, report.requests),
            (0, 1, 1),
            "{name}: {report:?}"
        );
        let stored = store.user(&dana).await.unwrap().unwrap();
        assert_eq!(
            stored.email.as_deref(),
            Some("dana@new.example.org"),
            "{name}"
        );
        assert_eq!(
            requests(&store).await,
            [(
                dana.clone(),
                "ldap-sync: directory details changed".to_string()
            )],
            "{name}"
        );

        ldap.ldapmodify(&format!(
            "dn: {eng}\nchangetype: modify\ndelete: member\nmember: {}\n",
            ldap.dn("uid=dana")
        ));
        let report = sync.run_once(&store, &eng_only).await.unwrap();
        assert_eq!(
            (report.joined, report.left, report.requests),
            (0, 1, 1),
            "{name}: {report:?}"
        );
        assert_eq!(membership(&store, &dana, &eng).await, None, "{name}");
        assert_eq!(
            requests(&store).await,
            [(dana.clone(), format!("ldap-sync: left {eng}"))],
            "{name}"
        );
    }
}

#[tokio::test]
async fn ldap_sync_marks_disabled_and_deleted_accounts_and_active_again() {
    for db in TestDb::all().await {
        let Some(ldap) = Sandbox::new() else { return };
        let name = db.name();
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db, &dir).await;
        ldap.ldapadd(&format!(
            "{}{}{}",
            ldap.person("fay"),
            ldap.person("gus"),
            ldap.person("hal")
        ));
        // The test slapd loads no ppolicy overlay (no pwdAccountLockedTime): an attribute the
        // test can set stands in for it.
        let provider = ldap.provider("disabled_filter = \"(description=disabled)\"");
        let fay = sign_in(&store, &provider, "fay").await;
        let gus = sign_in(&store, &provider, "gus").await;
        sign_in(&store, &provider, "hal").await;
        requests(&store).await;
        let sync = GroupSync::new(provider);

        let report = sync.run_once(&store, &[]).await.unwrap();
        assert_eq!(report.accounts_seen, 3, "{name}: {report:?}");
        assert_eq!(report.requests, 0, "{name}: all active already");

        ldap.ldapmodify(&format!(
            "dn: {}\nchangetype: modify\nadd: description\ndescription: disabled\n\n\
             dn: {}\nchangetype: delete\n",
            ldap.dn("uid=fay"),
            ldap.dn("uid=gus")
        ));
        let report = sync.run_once(&store, &[]).await.unwrap();
        assert_eq!(
            (
                report.disabled,
                report.deleted,
                report.reactivated,
                report.requests
            ),
            (1, 1, 0, 2),
            "{name}: {report:?}"
        );
        assert_eq!(
            status_of(&store, "fay").await,
            AccountStatus::Disabled,
            "{name}"
        );
        assert_eq!(
            status_of(&store, "gus").await,
            AccountStatus::Deleted,
            "{name}"
        );
        assert_eq!(
            status_of(&store, "hal").await,
            AccountStatus::Active,
            "{name}"
        );
        let mut expected = vec![
            (fay.clone(), "ldap-sync: account disabled".to_string()),
            (gus.clone(), "ldap-sync: account deleted".to_string()),
        ];
        expected.sort();
        assert_eq!(requests(&store).await, expected, "{name}");

        let report = sync.run_once(&store, &[]).await.unwrap();
        assert_eq!(report.requests, 0, "{name}: {report:?}");
        assert_eq!(requests(&store).await, [], "{name}");

        ldap.ldapmodify(&format!(
            "dn: {}\nchangetype: modify\ndelete: description\n",
            ldap.dn("uid=fay")
        ));
        let report = sync.run_once(&store, &[]).await.unwrap();
        assert_eq!(
            (report.reactivated, report.requests),
            (1, 1),
            "{name}: {report:?}"
        );
        assert_eq!(
            status_of(&store, "fay").await,
            AccountStatus::Active,
            "{name}"
        );
        assert_eq!(
            requests(&store).await,
            [(fay.clone(), "ldap-sync: account active again".to_string())],
            "{name}"
        );

        // A user_base where the search finds no one at all (a changed ACL or base, far likelier
        // than an emptied directory) marks no one deleted.
        let empty = ldap.dn("ou=empty");
        ldap.ldapadd(&format!(
            "dn: {empty}\nobjectClass: organizationalUnit\nou: empty\n"
        ));
        let mut settings = ldap.settings(SERVICE_DN, "brokerpw", "");
        settings.user_base = Some(empty);
        let blind = GroupSync::new(Arc::new(LdapProvider::new("corp", &settings).unwrap()));
        let report = blind.run_once(&store, &[]).await.unwrap();
        assert!(report.status_skipped.is_some(), "{name}: {report:?}");
        assert_eq!((report.deleted, report.requests), (0, 0), "{name}");
        assert_eq!(
            status_of(&store, "hal").await,
            AccountStatus::Active,
            "{name}"
        );
    }
}

#[tokio::test]
async fn ldap_sync_pages_through_a_group_of_1200_members() {
    const MEMBERS: usize = 1200;
    // One directory for both stores: adding (and removing) 1,200 memberOf values is slapd's
    // slowest work here.
    let Some(ldap) = Sandbox::new() else { return };
    let uids: Vec<String> = (0..MEMBERS).map(|n| format!("p{n:04}")).collect();
    let mut ldif: String = uids
        .iter()
        .map(|uid| {
            format!(
                "dn: {}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: Test\n\n",
                ldap.dn(&format!("uid={uid}"))
            )
        })
        .collect();
    let refs: Vec<&str> = uids.iter().map(String::as_str).collect();
    ldif.push_str(&ldap.group_of_names("big", &refs));
    // A reader with OpenLDAP's default limits, to see a search cut short.
    ldif.push_str(&ldap.person("reader"));
    ldap.ldapadd(&ldif);
    let big = ldap.dn("cn=big");
    let big_only = vec![big.clone()];
    for db in TestDb::all().await {
        let name = db.name();
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db, &dir).await;
        // Everyone signed in once (recorded directly: 1,200 password binds add nothing here);
        // subjects are uids so that they are known without reading the directory.
        for uid in &uids {
            let identity = Identity {
                provider: "corp".into(),
                subject: uid.clone(),
                login: Some(uid.clone()),
                email: None,
                display_name: Some(uid.clone()),
                groups: Vec::new(),
            };
            store.record_sign_in(&identity, "sign-in").await.unwrap();
        }
        requests(&store).await;
        // The service account may page without a total limit, but an unpaged search of it
        // stops at 500 entries (tests/peers/ldap.sh): all 1,200 members prove the paging.
        let sync = GroupSync::new(ldap.provider("subject_attribute = \"uid\""));
        let report = sync.run_once(&store, &big_only).await.unwrap();
        assert_eq!(
            (
                report.accounts_seen,
                report.members_seen,
                report.joined,
                report.requests
            ),
            // Everyone under user_base is an account, the reader too.
            (MEMBERS + 1, MEMBERS, MEMBERS, MEMBERS),
            "{name}: {report:?}"
        );
        assert!(report.failed_groups.is_empty(), "{name}: {report:?}");
        let groups = store.list_groups().await.unwrap();
        assert_eq!(groups.len(), 1, "{name}");
        assert_eq!(groups[0].external_id, big, "{name}");
        assert_eq!(groups[0].members, MEMBERS as i64, "{name}");
        assert_eq!(requests(&store).await.len(), MEMBERS, "{name}");

        let report = sync.run_once(&store, &big_only).await.unwrap();
        assert_eq!(
            (
                report.members_seen,
                report.joined,
                report.left,
                report.requests
            ),
            (MEMBERS, 0, 0, 0),
            "{name}: {report:?}"
        );

        // Cut short at an account's limit (500 entries in total over the pages), the run
        // fails instead of taking 500 people for all of them: no one leaves, no one is
        // marked deleted.
        let reader = ldap.settings(
            &ldap.dn("uid=reader"),
            "readerpw",
            "subject_attribute = \"uid\"",
        );
        assert_eq!(reader.sync_page_size, 500);
        let limited = GroupSync::new(Arc::new(LdapProvider::new("corp", &reader).unwrap()));
        match limited.run_once(&store, &big_only).await {
            Err(SyncError::Directory(e)) => assert!(
                e.to_string().contains("size limit") && e.to_string().contains("size.prtotal"),
                "{name}: {e}"
            ),
            other => panic!("{name}: expected a size-limit error, got {other:?}"),
        }
        assert_eq!(
            store.list_groups().await.unwrap()[0].members,
            MEMBERS as i64,
            "{name}"
        );
        let deleted = store
            .directory_users("corp")
            .await
            .unwrap()
            .into_iter()
            .filter(|u| u.status != AccountStatus::Active)
            .count();
        assert_eq!(deleted, 0, "{name}");
        assert_eq!(requests(&store).await, [], "{name}");
    }
}

#[tokio::test]
async fn ldap_sync_reads_group_entries_when_groups_come_from_a_search() {
    for db in TestDb::all().await {
        let Some(ldap) = Sandbox::new() else { return };
        let name = db.name();
        let dir = tempfile::tempdir().unwrap();
        let store = open(&db, &dir).await;
        let uniq = ldap.dn("cn=uniq");
        let posix = ldap.dn("cn=posix");
        ldap.ldapadd(&format!(
            "{}{}dn: {uniq}\nobjectClass: groupOfUniqueNames\ncn: uniq\nuniqueMember: {}\n\n\
             dn: {posix}\nobjectClass: posixGroup\ncn: posix\ngidNumber: 5001\nmemberUid: jon\n",
            ldap.person("ivy"),
            ldap.person("jon"),
            // Spelt differently from the entry's DN: DNs compare without case or spaces.
            ldap.dn("UID=Ivy").replace(',', ", ")
        ));
        let provider = ldap.provider(&format!(
            "groups = \"search\"\ngroup_base = \"{}\"\n",
            ldap.base
        ));
        let ivy = sign_in(&store, &provider, "ivy").await;
        let jon = sign_in(&store, &provider, "jon").await;
        assert!(membership(&store, &ivy, &uniq).await.is_some(), "{name}");
        assert!(membership(&store, &jon, &posix).await.is_some(), "{name}");
        // What the sign-ins asked of the reconciler is not this test's.
        requests(&store).await;
        let sync = GroupSync::new(provider);
        let groups = sync
            .groups_to_sync(&store, &ActivePolicies::default())
            .await
            .unwrap();
        assert_eq!(groups.len(), 2, "{name}");

        // The sync agrees with what the sign-in's group search found: nothing to do.
        let report = sync.run_once(&store, &groups).await.unwrap();
        assert_eq!(
            (
                report.members_seen,
                report.joined,
                report.left,
                report.requests
            ),
            (2, 0, 0, 0),
            "{name}: {report:?}"
        );

        ldap.ldapmodify(&format!(
            "dn: {uniq}\nchangetype: modify\nreplace: uniqueMember\nuniqueMember: {}\n\n\
             dn: {posix}\nchangetype: modify\nadd: memberUid\nmemberUid: IVY\n",
            ldap.dn("uid=jon")
        ));
        let report = sync.run_once(&store, &groups).await.unwrap();
        assert_eq!(
            (report.joined, report.left, report.requests),
            (2, 1, 3),
            "{name}: {report:?}"
        );
        assert_eq!(membership(&store, &ivy, &uniq).await, None, "{name}");
        assert!(membership(&store, &jon, &uniq).await.is_some(), "{name}");
        assert!(membership(&store, &ivy, &posix).await.is_some(), "{name}");
        let mut expected = vec![
            (ivy.clone(), format!("ldap-sync: left {uniq}")),
            (jon.clone(), format!("ldap-sync: joined {uniq}")),
            (ivy.clone(), format!("ldap-sync: joined {posix}")),
        ];
        expected.sort();
        assert_eq!(requests(&store).await, expected, "{name}");
    }
}

#[tokio::test]
async fn ldap_sync_loop_syncs_a_policy_target_no_member_signed_in_with_and_wakes_the_reconciler() {
    let Some(ldap) = Sandbox::new() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = open(&TestDb::Sqlite, &dir).await;
    ldap.ldapadd(&format!(
        "{}{}{}",
        ldap.person("kim"),
        ldap.person("lee"),
        ldap.group_of_names("pilot", &["lee"])
    ));
    let pilot = ldap.dn("cn=pilot");
    let provider = ldap.provider("");
    let kim = sign_in(&store, &provider, "kim").await;
    requests(&store).await;
    assert!(
        store.list_groups().await.unwrap().is_empty(),
        "no one known is in pilot yet"
    );
    let policies = ActivePolicies::default();
    policies.replace(Active {
        version: 1,
        set: PolicySet {
            policies: vec![Policy {
                name: "pilot".into(),
                description: None,
                file: "pilot.yaml".into(),
                groups: vec![GroupRef {
                    provider: "corp".into(),
                    id: pilot.clone(),
                }],
                platforms: None,
                profiles: Vec::new(),
                apps: Vec::new(),
                commands_on_join: Vec::new(),
                on_leave: OnLeave::default(),
            }],
            digest: String::new(),
        },
    });
    ldap.ldapmodify(&format!(
        "dn: {pilot}\nchangetype: modify\nadd: member\nmember: {}\n",
        ldap.dn("uid=kim")
    ));
    let wake = ReconcileWake::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = trustbroker::identity::ldap::sync::spawn(
        provider.clone(),
        trustbroker::cluster::Lease::new(
            store.clone(),
            "ldap-sync:corp",
            trustbroker::cluster::NodeId::generate(),
        ),
        store.clone(),
        policies,
        wake.clone(),
        provider.group_sync_interval().unwrap(),
        stopped,
    );
    tokio::time::timeout(Duration::from_secs(10), wake.woken())
        .await
        .expect("the sync wakes the reconciler after recording the change");
    assert_eq!(
        membership(&store, &kim, &pilot)
            .await
            .map(|(source, _)| source),
        Some(SOURCE.to_string())
    );
    assert_eq!(
        requests(&store).await,
        [(kim.clone(), format!("ldap-sync: joined {pilot}"))]
    );
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the loop stops at shutdown")
        .unwrap();
}
