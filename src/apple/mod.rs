//! The Apple MDM protocol: what a device says after it installs its enrollment profile.
//! `messages` and `plist` read what devices send, `identity` checks who signed it, `service`
//! runs check-in and the command channel, `commands` builds what the queue sends, `inventory`
//! keeps what devices report.

pub mod apns;
pub mod cache;
pub mod commands;
pub mod enrollment;
pub mod identity;
pub mod inventory;
pub mod lifecycle;
pub mod messages;
pub mod plist;
pub mod profile;
pub mod push_cert;
pub mod repush;
pub mod service;
