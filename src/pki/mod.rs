//! The PKI: the certificate authority and its SCEP front end. Owns keys and issuance policy;
//! reaches storage through `store`, never SQL.

pub mod ca;
pub mod challenge;
pub mod scep;
pub mod service;
pub mod validity;

/// PEM text for DER bytes, 64 base64 characters to a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in encoded.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
