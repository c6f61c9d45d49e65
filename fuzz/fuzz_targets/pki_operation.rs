//! Everything a PKIOperation body reaches before the CA trusts anything: the PKIMessage parser
//! (BER normalisation, SignedData, signature and digest checks), the unauthenticated header
//! reader used to address FAILURE replies, and the parsers for what an envelope carries (the
//! CSR, IssuerAndSerialNumber, IssuerAndSubject, a degenerate certificate bag). A requester signs with its own
//! self-signed key, so the envelope's content is as attacker-chosen as the outer message; the
//! first byte picks the parser so each is reached directly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trustbroker::pki::scep;

fuzz_target!(|data: &[u8]| {
    let Some((selector, body)) = data.split_first() else {
        return;
    };
    match selector % 5 {
        0 => {
            if let Ok(message) = scep::parse_pki_message(body) {
                let _ = message.header();
            }
            let _ = scep::parse_request_header(body);
        }
        1 => {
            let _ = scep::parse_csr(body);
        }
        2 => {
            let _ = scep::parse_issuer_and_serial(body);
        }
        3 => {
            let _ = scep::parse_issuer_and_subject(body);
        }
        _ => {
            let _ = scep::parse_degenerate_certificates(body);
        }
    }
});
