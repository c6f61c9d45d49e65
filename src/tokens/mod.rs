//! App-config tokens, the PingID pattern and beyond: per integration (an app and the managed
//! app configuration key its token goes under), shared tokens generated or imported, several
//! active, rotated and revoked; validation for the apps' back ends; and per-device tokens
//! signed by the broker (JWT), published keys (JWKS) and introspection.
//!
//! `shared` owns integrations, shared tokens, app clients and validation; `device` owns the
//! per-device signed tokens and their signing keys.

pub mod device;
pub mod shared;
