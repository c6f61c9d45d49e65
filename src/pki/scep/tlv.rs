//! A strict, bounded reader for BER/DER tag-length-value encodings, and a BER→DER-length
//! normaliser.
//!
//! Devices send CMS in BER: indefinite lengths (`30 80 … 00 00`) and OCTET STRINGs split into
//! constructed segments. `der` parses neither, so messages pass through [`normalise`] first,
//! which rewrites every length as definite and joins constructed OCTET STRINGs (universal tag 4)
//! into one primitive value. Everything else, including the order of SET members, is kept as
//! sent: signatures cover the bytes the sender produced.
//!
//! Written by hand because no maintained crate normalises BER while keeping the byte layout of
//! everything it does not need to change. Depth and size are bounded; nothing here can panic.

use super::ScepError;

/// Deepest nesting accepted (CMS messages nest about 12 levels).
const MAX_DEPTH: usize = 48;

const TAG_OCTET_STRING: u8 = 0x04;
const CONSTRUCTED: u8 = 0x20;

fn malformed(what: &str) -> ScepError {
    ScepError::Malformed(what.to_string())
}

/// One element of a definite-length encoding.
#[derive(Clone, Copy, Debug)]
pub struct Tlv<'a> {
    pub tag: u8,
    /// The value bytes (without tag and length).
    pub value: &'a [u8],
    /// The whole element (tag, length and value), as it appears in the input.
    pub raw: &'a [u8],
}

impl<'a> Tlv<'a> {
    pub fn is_constructed(&self) -> bool {
        self.tag & CONSTRUCTED != 0
    }

    /// The children of a constructed element.
    pub fn children(&self) -> Result<Vec<Tlv<'a>>, ScepError> {
        if !self.is_constructed() {
            return Err(malformed("expected a constructed element"));
        }
        read_all(self.value)
    }

    /// The children, checking this element's tag first.
    pub fn children_of(&self, tag: u8) -> Result<Vec<Tlv<'a>>, ScepError> {
        self.expect(tag)?;
        self.children()
    }

    pub fn expect(&self, tag: u8) -> Result<&Self, ScepError> {
        if self.tag == tag {
            Ok(self)
        } else {
            Err(ScepError::Malformed(format!(
                "expected tag {tag:#04x}, found {:#04x}",
                self.tag
            )))
        }
    }
}

/// Reads one definite-length element from the front of `input`; returns it and the rest.
pub fn read(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), ScepError> {
    let (&tag, rest) = input
        .split_first()
        .ok_or_else(|| malformed("truncated tag"))?;
    if tag & 0x1f == 0x1f {
        return Err(malformed("high tag numbers are not used in CMS"));
    }
    let (length, header_len) = match read_length(rest)? {
        (Some(length), n) => (length, n),
        (None, _) => return Err(malformed("indefinite length where definite is required")),
    };
    let start = 1 + header_len;
    let end = start
        .checked_add(length)
        .filter(|end| *end <= input.len())
        .ok_or_else(|| malformed("length runs past the end"))?;
    let value = input.get(start..end).ok_or_else(|| malformed("length"))?;
    let raw = input.get(..end).ok_or_else(|| malformed("length"))?;
    let rest = input.get(end..).ok_or_else(|| malformed("length"))?;
    Ok((Tlv { tag, value, raw }, rest))
}

/// Reads exactly one element spanning all of `input`.
pub fn read_exact(input: &[u8]) -> Result<Tlv<'_>, ScepError> {
    let (tlv, rest) = read(input)?;
    if !rest.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(tlv)
}

/// Reads every element of `input`, back to back.
pub fn read_all(mut input: &[u8]) -> Result<Vec<Tlv<'_>>, ScepError> {
    let mut out = Vec::new();
    while !input.is_empty() {
        let (tlv, rest) = read(input)?;
        out.push(tlv);
        input = rest;
    }
    Ok(out)
}

/// Parses a length: `(Some(n), bytes used)`, or `(None, 1)` for the indefinite form.
fn read_length(input: &[u8]) -> Result<(Option<usize>, usize), ScepError> {
    let (&first, rest) = input
        .split_first()
        .ok_or_else(|| malformed("truncated length"))?;
    if first < 0x80 {
        return Ok((Some(usize::from(first)), 1));
    }
    if first == 0x80 {
        return Ok((None, 1));
    }
    let count = usize::from(first & 0x7f);
    if count > 4 {
        return Err(malformed("length too large"));
    }
    let bytes = rest
        .get(..count)
        .ok_or_else(|| malformed("truncated length"))?;
    let length = bytes
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    Ok((Some(length), 1 + count))
}

/// Rewrites a BER encoding with definite lengths and joined OCTET STRINGs. DER input comes out
/// unchanged. `input` must hold exactly one element.
pub fn normalise(input: &[u8]) -> Result<Vec<u8>, ScepError> {
    let mut out = Vec::with_capacity(input.len());
    let rest = normalise_element(input, &mut out, 0)?;
    if !rest.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(out)
}

/// Normalises one element from the front of `input` into `out`; returns the rest of `input`.
/// A constructed element's children are written straight into `out` and its header put in
/// front of them once their length is known: one buffer for the whole message, where a
/// scratch buffer per level copied every byte once per nesting level.
fn normalise_element<'a>(
    input: &'a [u8],
    out: &mut Vec<u8>,
    depth: usize,
) -> Result<&'a [u8], ScepError> {
    if depth > MAX_DEPTH {
        return Err(malformed("nesting too deep"));
    }
    let (&tag, rest) = input
        .split_first()
        .ok_or_else(|| malformed("truncated tag"))?;
    if tag & 0x1f == 0x1f {
        return Err(malformed("high tag numbers are not used in CMS"));
    }
    if tag == 0 {
        return Err(malformed("unexpected end-of-contents"));
    }
    let (length, header_len) = read_length(rest)?;
    let body = rest
        .get(header_len..)
        .ok_or_else(|| malformed("truncated length"))?;
    let constructed = tag & CONSTRUCTED != 0;
    if !constructed {
        let length = length.ok_or_else(|| malformed("indefinite length on a primitive"))?;
        let value = body
            .get(..length)
            .ok_or_else(|| malformed("length runs past the end"))?;
        write_element(out, tag, value);
        return body.get(length..).ok_or_else(|| malformed("length"));
    }
    let start = out.len();
    let rest = match length {
        Some(length) => {
            let mut inner = body
                .get(..length)
                .ok_or_else(|| malformed("length runs past the end"))?;
            while !inner.is_empty() {
                inner = normalise_element(inner, out, depth + 1)?;
            }
            body.get(length..).ok_or_else(|| malformed("length"))?
        }
        None => {
            let mut inner = body;
            loop {
                match inner {
                    [0, 0, tail @ ..] => break tail,
                    [] => return Err(malformed("missing end-of-contents")),
                    _ => inner = normalise_element(inner, out, depth + 1)?,
                }
            }
        }
    };
    let tag = if tag == TAG_OCTET_STRING | CONSTRUCTED {
        // A segmented OCTET STRING: its value is the concatenation of its (primitive) parts.
        join_segments(out, start)?;
        TAG_OCTET_STRING
    } else {
        tag
    };
    insert_header(out, start, tag);
    Ok(rest)
}

/// Replaces the normalised OCTET STRING segments in `out[start..]` by their values, in place.
fn join_segments(out: &mut Vec<u8>, start: usize) -> Result<(), ScepError> {
    let (mut from, mut to) = (start, start);
    while from < out.len() {
        let (value_at, value_len) = {
            let segment = out.get(from..).unwrap_or_default();
            let (part, _) = read(segment)?;
            if part.tag != TAG_OCTET_STRING {
                return Err(malformed("OCTET STRING segment of another type"));
            }
            (from + part.raw.len() - part.value.len(), part.value.len())
        };
        out.copy_within(value_at..value_at + value_len, to);
        to += value_len;
        from = value_at + value_len;
    }
    out.truncate(to);
    Ok(())
}

/// Puts `tag` and the DER length of `out[start..]` in front of it.
fn insert_header(out: &mut Vec<u8>, start: usize, tag: u8) {
    let mut header = Vec::with_capacity(10);
    header.push(tag);
    push_length(&mut header, out.len() - start);
    out.splice(start..start, header);
}

/// Appends `len` as DER writes a length: one byte below 128, else the fewest bytes.
fn push_length(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let significant = bytes.get(skip..).unwrap_or_default();
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
}

/// Appends `tag`, the DER length of `value`, and `value`.
pub fn write_element(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    push_length(out, value.len());
    out.extend_from_slice(value);
}

/// DER builders for the structures this module writes (CertRep, envelopes, requests).
pub mod build {
    use const_oid::ObjectIdentifier;

    use super::write_element;

    pub fn element(tag: u8, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(value.len() + 6);
        write_element(&mut out, tag, value);
        out
    }

    pub fn sequence(parts: &[&[u8]]) -> Vec<u8> {
        element(0x30, &parts.concat())
    }

    /// A SET OF in DER order: members sorted by their encodings.
    pub fn set_of(mut members: Vec<Vec<u8>>) -> Vec<u8> {
        members.sort();
        element(0x31, &members.concat())
    }

    pub fn oid(oid: &ObjectIdentifier) -> Vec<u8> {
        element(0x06, oid.as_bytes())
    }

    pub fn octet_string(bytes: &[u8]) -> Vec<u8> {
        element(0x04, bytes)
    }

    pub fn printable_string(text: &str) -> Vec<u8> {
        element(0x13, text.as_bytes())
    }

    pub fn small_integer(value: u8) -> Vec<u8> {
        element(0x02, &[value])
    }

    /// `[n]` EXPLICIT around `inner`.
    pub fn explicit(n: u8, inner: &[u8]) -> Vec<u8> {
        element(0xa0 | n, inner)
    }

    /// AlgorithmIdentifier with NULL parameters (RSA and digests, as most SCEP peers write them).
    pub fn algorithm_null(oid: &ObjectIdentifier) -> Vec<u8> {
        sequence(&[&self::oid(oid), &[0x05, 0x00]])
    }

    /// Attribute ::= SEQUENCE { type, SET { value } }.
    pub fn attribute(kind: &ObjectIdentifier, value: &[u8]) -> Vec<u8> {
        sequence(&[&oid(kind), &element(0x31, value)])
    }
}

/// Every single-byte change of `input` (its high bit flipped, set to 0x80, set to 0) and every
/// truncation: what the tests of the normaliser and of its fast path run it on.
#[cfg(test)]
pub(crate) fn single_byte_mutations(input: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len() * 4);
    for i in 0..input.len() {
        for change in [|b: u8| b ^ 0x80, |_| 0x80, |_| 0x00] {
            let mut mutated = input.to_vec();
            mutated[i] = change(mutated[i]);
            out.push(mutated);
        }
        out.push(input[..i].to_vec());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(input: &[u8]) -> Result<Vec<u8>, ScepError> {
        let mut out = Vec::with_capacity(input.len());
        let rest = reference_element(input, &mut out, 0)?;
        if !rest.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        Ok(out)
    }

    /// The normaliser as it was before it wrote into one buffer (a scratch buffer per level):
    /// the oracle the single-buffer one is held to.
    fn reference_element<'a>(
        input: &'a [u8],
        out: &mut Vec<u8>,
        depth: usize,
    ) -> Result<&'a [u8], ScepError> {
        if depth > MAX_DEPTH {
            return Err(malformed("nesting too deep"));
        }
        let (&tag, rest) = input
            .split_first()
            .ok_or_else(|| malformed("truncated tag"))?;
        if tag & 0x1f == 0x1f {
            return Err(malformed("high tag numbers are not used in CMS"));
        }
        if tag == 0 {
            return Err(malformed("unexpected end-of-contents"));
        }
        let (length, header_len) = read_length(rest)?;
        let body = rest
            .get(header_len..)
            .ok_or_else(|| malformed("truncated length"))?;
        let constructed = tag & CONSTRUCTED != 0;
        if !constructed {
            let length = length.ok_or_else(|| malformed("indefinite length on a primitive"))?;
            let value = body
                .get(..length)
                .ok_or_else(|| malformed("length runs past the end"))?;
            write_element(out, tag, value);
            return body.get(length..).ok_or_else(|| malformed("length"));
        }
        // Children go to a scratch buffer first, since the length is known only afterwards.
        let mut children = Vec::new();
        let rest = match length {
            Some(length) => {
                let mut inner = body
                    .get(..length)
                    .ok_or_else(|| malformed("length runs past the end"))?;
                while !inner.is_empty() {
                    inner = reference_element(inner, &mut children, depth + 1)?;
                }
                body.get(length..).ok_or_else(|| malformed("length"))?
            }
            None => {
                let mut inner = body;
                loop {
                    match inner {
                        [0, 0, tail @ ..] => break tail,
                        [] => return Err(malformed("missing end-of-contents")),
                        _ => inner = reference_element(inner, &mut children, depth + 1)?,
                    }
                }
            }
        };
        if tag == TAG_OCTET_STRING | CONSTRUCTED {
            // A segmented OCTET STRING: its value is the concatenation of its (primitive) parts.
            let mut joined = Vec::with_capacity(children.len());
            for part in read_all(&children)? {
                if part.tag != TAG_OCTET_STRING {
                    return Err(malformed("OCTET STRING segment of another type"));
                }
                joined.extend_from_slice(part.value);
            }
            write_element(out, TAG_OCTET_STRING, &joined);
        } else {
            write_element(out, tag, &children);
        }
        Ok(rest)
    }

    /// The single-buffer normaliser writes what the one before it wrote, and refuses what it
    /// refused: on BER from devices and scepclient, and every single-byte change and
    /// truncation of them.
    #[test]
    fn one_buffer_normalises_as_the_scratch_buffers_did() {
        use base64::Engine;
        let header = base64::engine::general_purpose::STANDARD
            .decode(
                include_str!("../../../tests/fixtures/apple-mdm/mdm-signature/header2.b64").trim(),
            )
            .unwrap();
        let nested = [
            0x30, 0x80, 0x24, 0x80, 0x24, 0x80, 0x04, 0x01, b'a', 0x00, 0x00, 0x04, 0x02, b'b',
            b'c', 0x00, 0x00, 0x31, 0x03, 0x02, 0x01, 0x07, 0x00, 0x00,
        ];
        let long: Vec<u8> = [
            &[0x24u8, 0x80][..],
            &[0x04, 0x81, 0xc8],
            &[9u8; 200],
            &[0, 0],
        ]
        .concat();
        let scep_request = include_bytes!("../../../tests/fixtures/scep/tap_req0.der");
        for input in [header, nested.to_vec(), long, scep_request.to_vec()] {
            assert_eq!(normalise(&input).ok(), reference(&input).ok());
            for mutated in single_byte_mutations(&input) {
                assert_eq!(
                    normalise(&mutated).ok(),
                    reference(&mutated).ok(),
                    "{mutated:02x?}"
                );
            }
        }
    }

    #[test]
    fn der_passes_through_unchanged() {
        let der = [0x30, 0x06, 0x02, 0x01, 0x05, 0x04, 0x01, 0xaa];
        assert_eq!(normalise(&der).unwrap(), der);
    }

    #[test]
    fn indefinite_lengths_and_segmented_octet_strings_are_normalised() {
        // SEQUENCE (indefinite) { OCTET STRING (constructed, indefinite) { "ab", "c" } }
        let ber = [
            0x30, 0x80, 0x24, 0x80, 0x04, 0x02, b'a', b'b', 0x04, 0x01, b'c', 0x00, 0x00, 0x00,
            0x00,
        ];
        assert_eq!(
            normalise(&ber).unwrap(),
            [0x30, 0x05, 0x04, 0x03, b'a', b'b', b'c']
        );
    }

    #[test]
    fn long_lengths_are_written_minimally() {
        let value = vec![7u8; 300];
        let mut out = Vec::new();
        write_element(&mut out, 0x04, &value);
        assert_eq!(&out[..4], &[0x04, 0x82, 0x01, 0x2c]);
        assert_eq!(read_exact(&out).unwrap().value.len(), 300);
    }

    #[test]
    fn malformed_input_is_refused_without_panicking() {
        let cases: &[&[u8]] = &[
            &[],
            &[0x30],
            &[0x30, 0x85, 1, 2, 3, 4, 5],
            &[0x30, 0x05, 0x02],
            &[0x30, 0x80, 0x02, 0x01, 0x01],
            &[0x04, 0x80, 0x00, 0x00],
            &[0x1f, 0x01, 0x00],
            &[0x24, 0x03, 0x02, 0x01, 0x00],
            &[0x30, 0x00, 0xff],
        ];
        for case in cases {
            assert!(normalise(case).is_err(), "{case:02x?}");
        }
        let deep: Vec<u8> = std::iter::repeat_n([0x30u8, 0x80], 200).flatten().collect();
        assert!(normalise(&deep).is_err());
    }
}
