//! The wire format against a real capture (micromdm's scepclient and scepserver), in round
//! trips over every cipher and digest, in BER, and against tampering.

use std::sync::OnceLock;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use super::client::{self, ClientIdentity, Request};
use super::*;

const REQUEST: &[u8] = include_bytes!("../../../tests/fixtures/scep/tap_req0.der");
const RESPONSE: &[u8] = include_bytes!("../../../tests/fixtures/scep/tap_resp0.der");
const CA_PEM: &[u8] = include_bytes!("../../../tests/fixtures/scep/ca.pem");
const CA_KEY: &str = include_str!("../../../tests/fixtures/scep/ca-key-decrypted.pem");

fn fixture_ca() -> (Vec<u8>, RsaDecryptionKey) {
    let cert = CertificateDer::from_pem_slice(CA_PEM).unwrap().to_vec();
    let key = openssl::rsa::Rsa::private_key_from_pem(CA_KEY.as_bytes()).unwrap();
    (cert, RsaDecryptionKey::from_rsa(key).unwrap())
}

/// Two RSA identities, made once: generating keys is the slow part.
fn identities() -> &'static (ClientIdentity, ClientIdentity) {
    static IDS: OnceLock<(ClientIdentity, ClientIdentity)> = OnceLock::new();
    IDS.get_or_init(|| {
        (
            ClientIdentity::generate(2048).unwrap(),
            ClientIdentity::generate(2048).unwrap(),
        )
    })
}

fn request_with(cipher: ContentCipher, digest: DigestAlgorithm) -> Vec<u8> {
    let (client, server) = identities();
    let csr = client.csr("device", Some("one-time"), digest).unwrap();
    client::build_request(
        client,
        &Request {
            message_type: MessageType::PkcsReq,
            content: &csr,
            recipient_der: &server.certificate_der,
            cipher,
            digest,
            transaction_id: "txn-1",
            sender_nonce: &[7; 16],
        },
    )
    .unwrap()
}

#[test]
fn scepclient_request_parses_verifies_and_opens() {
    let message = parse_pki_message(REQUEST).unwrap();
    assert_eq!(message.message_type, MessageType::PkcsReq);
    assert_eq!(message.digest, DigestAlgorithm::Sha1);
    assert_eq!(message.sender_nonce.len(), 16);
    assert!(!message.transaction_id.is_empty());
    let (ca, key) = fixture_ca();
    let opened = open_envelope(&message.enveloped_data, &ca, &key, CipherPolicy::ANY).unwrap();
    assert_eq!(opened.cipher, ContentCipher::DesCbc);
    let csr = parse_csr(&opened.content).unwrap();
    assert_eq!(csr.challenge_password.as_deref(), Some("secret123"));
    assert_eq!(csr.rsa_key_bits, Some(2048));
    // The request is signed by the key it asks to certify.
    let signer_key = super::signed_data::rsa_public_key(&message.signer_certificate).unwrap();
    assert!(
        csr.public_key_der
            .windows(signer_key.len())
            .any(|w| w == signer_key.as_slice())
    );
}

#[test]
fn scepserver_reply_verifies_and_answers_the_request() {
    let request = parse_pki_message(REQUEST).unwrap();
    let reply = parse_pki_message(RESPONSE).unwrap();
    assert_eq!(reply.message_type, MessageType::CertRep);
    assert_eq!(reply.pki_status, Some(PkiStatus::Success));
    assert_eq!(reply.transaction_id, request.transaction_id);
    assert_eq!(
        reply.recipient_nonce.as_deref(),
        Some(request.sender_nonce.as_slice())
    );
    let (ca, _) = fixture_ca();
    assert_eq!(reply.signer_certificate, ca);
}

#[test]
fn every_cipher_and_digest_round_trips() {
    let (client, server) = identities();
    for cipher in ContentCipher::ALL {
        for digest in [
            DigestAlgorithm::Sha1,
            DigestAlgorithm::Sha256,
            DigestAlgorithm::Sha512,
        ] {
            let body = request_with(cipher, digest);
            let message = parse_pki_message(&body).unwrap();
            assert_eq!(message.digest, digest);
            let opened = open_envelope(
                &message.enveloped_data,
                &server.certificate_der,
                &server.decryption_key,
                CipherPolicy::ANY,
            )
            .unwrap();
            assert_eq!(opened.cipher, cipher);
            let csr = parse_csr(&opened.content).unwrap();
            assert_eq!(csr.challenge_password.as_deref(), Some("one-time"));

            let issued = vec![
                client.certificate_der.clone(),
                server.certificate_der.clone(),
            ];
            let reply = cert_rep_success(&message, &issued, opened.cipher, server).unwrap();
            let outcome = client::open_cert_rep(&reply, client, &server.certificate_der).unwrap();
            assert_eq!(outcome.status, PkiStatus::Success, "{cipher:?} {digest:?}");
            assert_eq!(outcome.certificates, issued);
            assert_eq!(outcome.transaction_id, "txn-1");
            assert_eq!(outcome.recipient_nonce.as_deref(), Some(&[7u8; 16][..]));
            assert_eq!(outcome.digest, digest);
        }
    }
}

#[test]
fn failures_carry_fail_info_and_no_envelope() {
    let (client, server) = identities();
    let message = parse_pki_message(&request_with(
        ContentCipher::Aes128Cbc,
        DigestAlgorithm::Sha256,
    ))
    .unwrap();
    let reply = cert_rep_failure(&message.header(), FailInfo::BadRequest, server).unwrap();
    let outcome = client::open_cert_rep(&reply, client, &server.certificate_der).unwrap();
    assert_eq!(outcome.status, PkiStatus::Failure);
    assert_eq!(outcome.fail_info, Some(FailInfo::BadRequest));
    assert!(outcome.certificates.is_empty());
    // A reply from anyone but the expected server is refused by the client.
    assert!(client::open_cert_rep(&reply, client, &client.certificate_der).is_err());
}

/// Re-encodes DER as BER the way streaming encoders do: indefinite lengths on every
/// constructed element, and OCTET STRINGs over 64 bytes split into segments.
fn to_ber(der: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for element in tlv::read_all(der).unwrap() {
        if element.tag == 0x04 && element.value.len() > 64 {
            out.extend_from_slice(&[0x24, 0x80]);
            for chunk in element.value.chunks(50) {
                tlv::write_element(&mut out, 0x04, chunk);
            }
            out.extend_from_slice(&[0, 0]);
        } else if element.is_constructed() {
            out.extend_from_slice(&[element.tag, 0x80]);
            out.extend(to_ber(element.value));
            out.extend_from_slice(&[0, 0]);
        } else {
            out.extend_from_slice(element.raw);
        }
    }
    out
}

#[test]
fn ber_with_indefinite_lengths_verifies() {
    let der = request_with(ContentCipher::DesEde3Cbc, DigestAlgorithm::Sha1);
    let ber = to_ber(&der);
    assert_ne!(ber, der);
    assert_eq!(&ber[..2], &[0x30, 0x80]);
    let message = parse_pki_message(&ber).unwrap();
    let (_, server) = identities();
    // The envelope inside was BER too, with its encrypted content in segments.
    let opened = open_envelope(
        &to_ber(&message.enveloped_data),
        &server.certificate_der,
        &server.decryption_key,
        CipherPolicy::ANY,
    )
    .unwrap();
    assert!(parse_csr(&opened.content).is_ok());
}

#[test]
fn tampering_is_detected() {
    let body = request_with(ContentCipher::Aes256Cbc, DigestAlgorithm::Sha256);
    // The last bytes are the signature value.
    let mut bad_signature = body.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 1;
    assert!(matches!(
        parse_pki_message(&bad_signature),
        Err(ScepError::BadSignature)
    ));
    // A byte of the encapsulated content (deep inside the envelope): messageDigest mismatch.
    let mut bad_content = body.clone();
    bad_content[400] ^= 1;
    let err = parse_pki_message(&bad_content).unwrap_err();
    assert_eq!(err.fail_info(), FailInfo::BadMessageCheck, "{err}");
    // The header of a tampered message can still be read to address a failure reply.
    let header = parse_request_header(&bad_signature).unwrap();
    assert_eq!(header.transaction_id, "txn-1");
}

#[test]
fn envelopes_for_someone_else_are_refused() {
    let body = request_with(ContentCipher::Aes128Cbc, DigestAlgorithm::Sha256);
    let message = parse_pki_message(&body).unwrap();
    let (client, _) = identities();
    let err = open_envelope(
        &message.enveloped_data,
        &client.certificate_der,
        &client.decryption_key,
        CipherPolicy::ANY,
    )
    .unwrap_err();
    assert!(matches!(err, ScepError::WrongRecipient), "{err}");
    assert_eq!(err.fail_info(), FailInfo::BadMessageCheck);
    // The right certificate with the wrong key does not decrypt, and says no more than that.
    let (_, ca_key) = fixture_ca();
    let (_, server) = identities();
    let err = open_envelope_with(
        &message.enveloped_data,
        &server.certificate_der,
        &ca_key,
        CipherPolicy::ANY,
        parse_csr,
    )
    .unwrap_err();
    assert!(matches!(err, ScepError::Undecryptable), "{err}");
}

#[test]
fn unsupported_ciphers_get_bad_alg() {
    let (client, server) = identities();
    let csr = client.csr("d", Some("c"), DigestAlgorithm::Sha256).unwrap();
    let mut envelope =
        seal_envelope(&csr, &server.certificate_der, ContentCipher::Aes128Cbc).unwrap();
    // AES-128-CBC (…4.1.2) becomes AES-192-CBC (…4.1.22), which is not implemented.
    let aes128 = [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x02];
    let at = envelope
        .windows(aes128.len())
        .position(|w| w == aes128)
        .unwrap();
    envelope[at + aes128.len() - 1] = 0x16;
    let err = open_envelope(
        &envelope,
        &server.certificate_der,
        &server.decryption_key,
        CipherPolicy::ANY,
    )
    .unwrap_err();
    assert!(matches!(err, ScepError::UnsupportedAlgorithm(_)), "{err}");
    assert_eq!(err.fail_info(), FailInfo::BadAlg);
}

#[test]
fn garbage_never_panics() {
    let body = request_with(ContentCipher::DesCbc, DigestAlgorithm::Sha256);
    let mut inputs: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"hello".to_vec(),
        vec![0x30, 0x80],
        vec![0xff; 64],
        body[..body.len() / 2].to_vec(),
    ];
    // Every single-byte truncation point of the header region.
    for cut in 0..64 {
        inputs.push(body[..cut].to_vec());
    }
    for input in &inputs {
        assert!(parse_pki_message(input).is_err());
        assert!(parse_request_header(input).is_err() || !input.is_empty());
        let _ = parse_csr(input);
        let (_, server) = identities();
        let _ = open_envelope(
            input,
            &server.certificate_der,
            &server.decryption_key,
            CipherPolicy::ANY,
        );
        let _ = parse_degenerate_certificates(input);
    }
}

#[test]
fn csr_self_signatures_are_checked() {
    let (client, _) = identities();
    let mut csr = client.csr("d", Some("c"), DigestAlgorithm::Sha1).unwrap();
    assert!(parse_csr(&csr).is_ok());
    let last = csr.len() - 1;
    csr[last] ^= 1;
    assert!(matches!(parse_csr(&csr), Err(ScepError::BadSignature)));
}

#[test]
fn degenerate_bundles_round_trip() {
    let (client, server) = identities();
    let certs = vec![
        client.certificate_der.clone(),
        server.certificate_der.clone(),
    ];
    let bundle = degenerate_certificates(&certs).unwrap();
    assert_eq!(parse_degenerate_certificates(&bundle).unwrap(), certs);
    assert!(degenerate_certificates(&[b"not a certificate".to_vec()]).is_err());
}

#[test]
fn single_des_is_refused_unless_allowed() {
    let (client, server) = identities();
    let csr = client.csr("d", Some("c"), DigestAlgorithm::Sha256).unwrap();
    let strict = CipherPolicy {
        allow_single_des: false,
    };
    let des = seal_envelope(&csr, &server.certificate_der, ContentCipher::DesCbc).unwrap();
    let err = open_envelope(
        &des,
        &server.certificate_der,
        &server.decryption_key,
        strict,
    )
    .unwrap_err();
    assert!(matches!(err, ScepError::UnsupportedAlgorithm(_)), "{err}");
    assert_eq!(err.fail_info(), FailInfo::BadAlg);
    let legacy = CipherPolicy {
        allow_single_des: true,
    };
    assert!(
        open_envelope(
            &des,
            &server.certificate_der,
            &server.decryption_key,
            legacy
        )
        .is_ok()
    );
    for cipher in [
        ContentCipher::DesEde3Cbc,
        ContentCipher::Aes128Cbc,
        ContentCipher::Aes256Cbc,
    ] {
        let envelope = seal_envelope(&csr, &server.certificate_der, cipher).unwrap();
        assert!(
            open_envelope(
                &envelope,
                &server.certificate_der,
                &server.decryption_key,
                strict
            )
            .is_ok()
        );
    }
}

/// Envelopes around the same CSR that fail in every way a padding or Bleichenbacher oracle
/// would probe, and well-padded ones that hold no valid CSR.
fn hostile_envelopes(
    csr: &[u8],
    recipient: &[u8],
    cipher: ContentCipher,
) -> Vec<(String, Vec<u8>)> {
    let block = match cipher {
        ContentCipher::DesCbc | ContentCipher::DesEde3Cbc => 8,
        _ => 16,
    };
    let whole = |mut content: Vec<u8>, last: u8| {
        content.resize(content.len().div_ceil(block) * block + block, 0x5a);
        if let Some(b) = content.last_mut() {
            *b = last;
        }
        content
    };
    let mut spoiled_inside = whole(csr.to_vec(), 3);
    let n = spoiled_inside.len();
    spoiled_inside[n - 2] = 3;
    spoiled_inside[n - 3] = 4;
    let mut bad_signature = csr.to_vec();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 1;
    let mut bad_key = seal_envelope(csr, recipient, cipher).unwrap();
    let at = bad_key
        .windows(4)
        .position(|w| w == [0x04, 0x82, 0x01, 0x00])
        .unwrap();
    bad_key[at + 4 + 100] ^= 0x10;
    let unpadded = |blocks: Vec<u8>| seal_envelope_unpadded(&blocks, recipient, cipher).unwrap();
    vec![
        ("padding byte 0".into(), unpadded(whole(csr.to_vec(), 0))),
        (
            "padding byte over the block".into(),
            unpadded(whole(csr.to_vec(), block as u8 + 1)),
        ),
        ("padding spoiled inside".into(), unpadded(spoiled_inside)),
        (
            "well-padded garbage".into(),
            seal_envelope(&crate::random::bytes::<300>(), recipient, cipher).unwrap(),
        ),
        (
            "well-padded DER that is no CSR".into(),
            seal_envelope(recipient, recipient, cipher).unwrap(),
        ),
        (
            "well-padded CSR whose signature fails".into(),
            seal_envelope(&bad_signature, recipient, cipher).unwrap(),
        ),
        ("content key tampered".into(), bad_key),
    ]
}

#[test]
fn padding_content_and_key_transport_failures_are_one_error() {
    let (client, server) = identities();
    let csr = client.csr("d", Some("c"), DigestAlgorithm::Sha256).unwrap();
    for cipher in [
        ContentCipher::DesEde3Cbc,
        ContentCipher::Aes128Cbc,
        ContentCipher::Aes256Cbc,
    ] {
        for (what, envelope) in hostile_envelopes(&csr, &server.certificate_der, cipher) {
            let err = open_envelope_with(
                &envelope,
                &server.certificate_der,
                &server.decryption_key,
                CipherPolicy::ANY,
                parse_csr,
            )
            .unwrap_err();
            assert!(matches!(err, ScepError::Undecryptable), "{what}: {err}");
        }
        let good = seal_envelope(&csr, &server.certificate_der, cipher).unwrap();
        let (read, _) = open_envelope_with(
            &good,
            &server.certificate_der,
            &server.decryption_key,
            CipherPolicy::ANY,
            parse_csr,
        )
        .unwrap();
        assert_eq!(read.der, csr);
    }
}

/// Not a pass/fail test (timing is too noisy for that): prints how long opening each kind of
/// hostile envelope takes. `cargo test --release --lib envelope_timing -- --ignored --nocapture`
#[test]
#[ignore]
fn envelope_timing() {
    let (client, server) = identities();
    let csr = client.csr("d", Some("c"), DigestAlgorithm::Sha256).unwrap();
    let mut cases = hostile_envelopes(&csr, &server.certificate_der, ContentCipher::Aes128Cbc);
    cases.push((
        "valid".into(),
        seal_envelope(&csr, &server.certificate_der, ContentCipher::Aes128Cbc).unwrap(),
    ));
    const ROUNDS: usize = 400;
    let mut samples = vec![Vec::with_capacity(ROUNDS); cases.len()];
    // Interleaved, so drift in the machine's speed falls on every case alike.
    for _ in 0..ROUNDS {
        for (i, (_, envelope)) in cases.iter().enumerate() {
            let start = std::time::Instant::now();
            let _ = open_envelope_with(
                envelope,
                &server.certificate_der,
                &server.decryption_key,
                CipherPolicy::ANY,
                parse_csr,
            );
            samples[i].push(start.elapsed().as_nanos());
        }
    }
    for ((what, _), mut times) in cases.iter().zip(samples) {
        times.sort_unstable();
        println!(
            "{what:40} median {:>8} ns  p10 {:>8}  p90 {:>8}",
            times[ROUNDS / 2],
            times[ROUNDS / 10],
            times[ROUNDS * 9 / 10]
        );
    }
}
