//! trustbroker: an identity-integrated MDM trust broker.
//!
//! `main.rs` only wires things together; everything it starts lives here so that the
//! integration tests can start the same server in-process.

// Nothing that came from outside may panic the server: no unwrap, expect, panic or indexing
// in non-test code; the few justified exceptions carry an `allow` and a reason where they stand.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod admin;
pub mod allocator;
pub mod apple;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod connections;
pub mod console;
pub mod enroll;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod pki;
pub mod policy;
pub mod random;
pub mod scim;
pub mod secrets;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod tokens;
