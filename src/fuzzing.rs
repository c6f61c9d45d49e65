//! Entry points for the fuzz targets under `fuzz/`: each target is a one-line call into here,
//! so a target cannot drift from the code path the server runs. Not an API.

use crate::apple::messages::{CheckIn, Report};
use crate::apple::{identity, plist};

/// An XML plist, as a device's body reaches the reader (binary input is left to its own
/// target).
pub fn xml_plist(data: &[u8]) {
    if !data.starts_with(b"bplist00") {
        let _ = plist::parse_value(data);
    }
}

/// A binary plist: the fuzzer's bytes follow the magic, so none are spent finding it.
pub fn binary_plist(data: &[u8]) {
    let mut body = b"bplist00".to_vec();
    body.extend_from_slice(data);
    let _ = plist::parse_value(&body);
}

/// A check-in message and a command-channel report, from the same bytes.
pub fn check_in(data: &[u8]) {
    let _ = CheckIn::from_plist(data);
    let _ = Report::from_plist(data);
}

/// An `Mdm-Signature`: the fuzzer's bytes are the CMS (BER or DER) the header would carry in
/// base64, over a fixed body.
pub fn mdm_signature(data: &[u8]) {
    use base64::Engine;
    let header = base64::engine::general_purpose::STANDARD.encode(data);
    let _ = identity::verify_signature(&header, b"<plist><dict/></plist>");
}
