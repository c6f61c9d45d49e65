//! The integration suite: one test binary, one module per area. Servers run in-process on
//! ephemeral loopback ports (or as the real `trustbroker` binary where the command line is under
//! test); the real peers (PostgreSQL, slapd, the OIDC provider, SimpleSAMLphp, scep) are started
//! by `tests/run.sh`, which tells the suite where they are through `TRUSTBROKER_TEST_*`.

mod api;
mod apns;
mod backup;
mod ca;
mod cli;
mod cluster;
mod connections;
mod console;
mod device;
mod device_identity;
mod device_tokens;
mod faults;
mod full_disk;
mod harness;
mod ldap;
mod ldap_sync;
mod lifecycle;
mod mdm;
mod nginx;
mod openapi;
mod ops_contract;
mod outage;
mod peers;
mod pg_tls;
mod policy;
mod portal;
mod profiles;
mod saml;
mod scep;
mod schema;
mod scim;
mod store;
mod tokens;
mod upgrade;
