//! trustbroker: an identity-integrated MDM trust broker.
//!
//! `main.rs` only wires things together; everything it starts lives here so that the
//! integration tests can start the same server in-process.

pub mod admin;
pub mod apple;
pub mod audit;
pub mod config;
pub mod connections;
pub mod enroll;
pub mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod pki;
pub mod random;
pub mod secrets;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;
