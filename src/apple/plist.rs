//! Property lists from devices: XML or binary, read strictly and within [`Limits`].
//!
//! A plist is built from the `plist` crate's event stream rather than with
//! `plist::Value::from_reader`, so that every event is counted as it arrives: a binary plist's
//! shared object references are expanded by the reader, and a 4 KB body whose objects point at
//! each other many times over expands to 10⁹ elements. Counting each element and each byte of
//! string or data as it is reached (a reused reference counts every time) stops such a body
//! after [`Limits::elements`] events, in time proportional to the limit, not to the expansion.
//! Nesting is bounded too, before anything recursive (building, comparing or dropping a
//! value) can exhaust the stack. XML with a DOCTYPE internal subset (entity declarations) is
//! refused: devices never send one.

use std::io::Cursor;

use plist::stream::{BinaryReader, Event, XmlReader};
use plist::{Dictionary, Value};

/// How much of a plist is read before it is refused.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Deepest nesting of arrays and dictionaries.
    pub depth: usize,
    /// Values, keys and containers, each counted every time the reader reaches it.
    pub elements: usize,
    /// Bytes of strings, keys and data together, counted the same way.
    pub bytes: usize,
}

impl Limits {
    /// What a device may send. Apple's messages nest a handful of levels (a DeviceInformation
    /// result: dict → QueryResponses → a dict of dicts); a Mac with a few thousand apps
    /// answers InstalledApplicationList with some tens of thousands of elements.
    pub const DEVICE: Limits = Limits {
        depth: 32,
        elements: 250_000,
        bytes: 16 * 1024 * 1024,
    };

    /// What is cheap enough to read on an async worker (a few hundred microseconds at most):
    /// every Idle, check-in and ordinary command result fits with room to spare.
    pub const INLINE: Limits = Limits {
        depth: 32,
        elements: 4_096,
        bytes: 256 * 1024,
    };
}

/// Deepest nesting accepted from a device.
pub const MAX_DEPTH: usize = Limits::DEVICE.depth;

#[derive(Debug, thiserror::Error)]
pub enum PlistError {
    #[error("the body is empty")]
    Empty,
    #[error("the property list nests deeper than {0} levels")]
    TooDeep(usize),
    /// Over [`Limits::elements`] or [`Limits::bytes`]; with [`Limits::INLINE`] this only means
    /// "read it again off the async workers, with the device limits".
    #[error("the property list is too large: more than {0}")]
    TooLarge(String),
    #[error("XML with a DOCTYPE internal subset (entity declarations) is not accepted")]
    InternalSubset,
    #[error("not a property list: {0}")]
    Malformed(String),
    #[error("the property list does not have the expected shape: {0}")]
    Shape(String),
}

/// Reads a plist within [`Limits::DEVICE`].
pub fn parse_value(body: &[u8]) -> Result<Value, PlistError> {
    parse_value_within(body, &Limits::DEVICE)
}

/// Reads a plist (XML or binary) within `limits`.
pub fn parse_value_within(body: &[u8], limits: &Limits) -> Result<Value, PlistError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(PlistError::Empty);
    }
    if body.starts_with(b"bplist00") {
        build(BinaryReader::new(Cursor::new(body)), limits)
    } else {
        if has_internal_subset(body) {
            return Err(PlistError::InternalSubset);
        }
        build(XmlReader::new(Cursor::new(body)), limits)
    }
}

/// Whether the XML prolog declares a DOCTYPE with an internal subset (`<!DOCTYPE x [ … ]>`),
/// the only place entities can be declared. Apple's own DOCTYPE has none.
fn has_internal_subset(body: &[u8]) -> bool {
    let Some(start) = find(body, b"<!DOCTYPE") else {
        return find(body, b"<!ENTITY").is_some();
    };
    let declaration = body.get(start..).unwrap_or_default();
    let end = declaration
        .iter()
        .position(|&b| b == b'>')
        .unwrap_or(declaration.len());
    declaration
        .get(..end)
        .is_some_and(|head| head.contains(&b'['))
        || find(body, b"<!ENTITY").is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A container being filled.
enum Open {
    Array(Vec<Value>),
    Dict(Dictionary, Option<String>),
}

/// The counts so far, against the limits.
struct Budget<'a> {
    limits: &'a Limits,
    elements: usize,
    bytes: usize,
}

impl Budget<'_> {
    fn spend(&mut self, bytes: usize) -> Result<(), PlistError> {
        self.elements += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        if self.elements > self.limits.elements {
            return Err(PlistError::TooLarge(format!(
                "{} elements",
                self.limits.elements
            )));
        }
        if self.bytes > self.limits.bytes {
            return Err(PlistError::TooLarge(format!(
                "{} bytes of strings and data",
                self.limits.bytes
            )));
        }
        Ok(())
    }
}

/// Builds one value from an event stream, counting as it goes; the stream must end with it.
fn build<I>(events: I, limits: &Limits) -> Result<Value, PlistError>
where
    I: Iterator<Item = Result<Event<'static>, plist::Error>>,
{
    let mut budget = Budget {
        limits,
        elements: 0,
        bytes: 0,
    };
    let mut open: Vec<Open> = Vec::new();
    let mut done: Option<Value> = None;
    for event in events {
        let event = event.map_err(|e| PlistError::Malformed(e.to_string()))?;
        if done.is_some() {
            return Err(PlistError::Malformed(
                "content after the top-level value".into(),
            ));
        }
        let value = match event {
            Event::StartArray(_) | Event::StartDictionary(_) => {
                budget.spend(0)?;
                if open.len() >= limits.depth {
                    return Err(PlistError::TooDeep(limits.depth));
                }
                open.push(match event {
                    Event::StartArray(_) => Open::Array(Vec::new()),
                    _ => Open::Dict(Dictionary::new(), None),
                });
                continue;
            }
            Event::EndCollection => match open.pop() {
                Some(Open::Array(items)) => Value::Array(items),
                Some(Open::Dict(dict, None)) => Value::Dictionary(dict),
                Some(Open::Dict(_, Some(key))) => {
                    return Err(PlistError::Malformed(format!("key {key:?} has no value")));
                }
                None => return Err(PlistError::Malformed("unbalanced end of collection".into())),
            },
            Event::Boolean(b) => scalar(&mut budget, Value::Boolean(b), 0)?,
            Event::Integer(i) => scalar(&mut budget, Value::Integer(i), 0)?,
            Event::Real(r) => scalar(&mut budget, Value::Real(r), 0)?,
            Event::Date(d) => scalar(&mut budget, Value::Date(d), 0)?,
            Event::Uid(u) => scalar(&mut budget, Value::Uid(u), 0)?,
            Event::Data(d) => {
                let len = d.len();
                scalar(&mut budget, Value::Data(d.into_owned()), len)?
            }
            Event::String(s) => {
                let len = s.len();
                // A string where a dictionary expects a key is that key.
                if let Some(Open::Dict(_, pending @ None)) = open.last_mut() {
                    budget.spend(len)?;
                    *pending = Some(s.into_owned());
                    continue;
                }
                scalar(&mut budget, Value::String(s.into_owned()), len)?
            }
            _ => return Err(PlistError::Malformed("an unknown kind of value".into())),
        };
        match open.last_mut() {
            None => done = Some(value),
            Some(Open::Array(items)) => items.push(value),
            Some(Open::Dict(dict, pending)) => match pending.take() {
                Some(key) => {
                    dict.insert(key, value);
                }
                None => {
                    return Err(PlistError::Malformed(
                        "a dictionary key is not a string".into(),
                    ));
                }
            },
        }
    }
    done.ok_or_else(|| PlistError::Malformed("the property list ends early".into()))
}

fn scalar(budget: &mut Budget<'_>, value: Value, bytes: usize) -> Result<Value, PlistError> {
    budget.spend(bytes)?;
    Ok(value)
}

/// XML text of a value (what the broker sends: every Apple client reads XML).
pub fn to_xml(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail for a value we built.
    if value.to_writer_xml(&mut out).is_err() {
        out.clear();
    }
    out
}

/// Hostile inputs for tests and fuzzing seeds.
#[doc(hidden)]
pub mod testing {
    /// A binary plist of `levels` arrays, each holding `fanout` references to the next: a few
    /// hundred bytes that expand to fanout^levels elements (`fanout` < 15: a 4-bit count).
    pub fn reference_bomb(levels: usize, fanout: usize) -> Vec<u8> {
        let mut out = b"bplist00".to_vec();
        let mut offsets = Vec::new();
        for level in 0..levels {
            offsets.push(out.len());
            let next = (level + 1) as u8;
            // An array marker with a 4-bit count, then `fanout` one-byte references.
            out.push(0xA0 | fanout as u8);
            out.extend(std::iter::repeat_n(next, fanout));
        }
        offsets.push(out.len());
        out.extend([0x51, b'x']); // a one-character ASCII string
        let table = out.len();
        out.extend(offsets.iter().map(|&o| o as u8));
        // Trailer: 6 unused bytes, offset size 1, reference size 1, object count, root, table.
        out.extend([0u8; 6]);
        out.extend([1u8, 1]);
        out.extend((offsets.len() as u64).to_be_bytes());
        out.extend(0u64.to_be_bytes());
        out.extend((table as u64).to_be_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::reference_bomb;
    use super::*;

    fn nested(depth: usize) -> Vec<u8> {
        let mut xml = String::from("<?xml version=\"1.0\"?><plist version=\"1.0\">");
        xml.push_str(&"<array>".repeat(depth));
        xml.push_str(&"</array>".repeat(depth));
        xml.push_str("</plist>");
        xml.into_bytes()
    }

    #[test]
    fn nesting_is_bounded_before_anything_recurses() {
        assert!(parse_value(&nested(MAX_DEPTH)).is_ok());
        assert!(matches!(
            parse_value(&nested(MAX_DEPTH + 1)),
            Err(PlistError::TooDeep(_))
        ));
        // Deep enough to overflow the stack if it were built and dropped.
        assert!(matches!(
            parse_value(&nested(200_000)),
            Err(PlistError::TooDeep(_))
        ));
    }

    #[test]
    fn shared_references_count_every_time_they_are_reached() {
        // 14^8 ≈ 1.5 billion elements from a body of about 170 bytes.
        let bomb = reference_bomb(8, 14);
        assert!(bomb.len() < 200);
        let started = std::time::Instant::now();
        assert!(matches!(parse_value(&bomb), Err(PlistError::TooLarge(_))));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // The same shape, small enough, reads: the format itself is fine.
        let small = parse_value(&reference_bomb(2, 3)).unwrap();
        assert_eq!(small.as_array().map(Vec::len), Some(3));
    }

    #[test]
    fn strings_and_data_are_bounded_in_total() {
        let big = "y".repeat(300 * 1024);
        let xml = format!("<plist><array><string>{big}</string></array></plist>");
        assert!(parse_value(xml.as_bytes()).is_ok());
        assert!(matches!(
            parse_value_within(xml.as_bytes(), &Limits::INLINE),
            Err(PlistError::TooLarge(_))
        ));
    }

    #[test]
    fn internal_subsets_are_refused_and_apples_doctype_is_not() {
        let laughs = b"<?xml version=\"1.0\"?><!DOCTYPE plist [<!ENTITY a \"aaaa\">]>\
                       <plist><string>&a;</string></plist>";
        assert!(matches!(
            parse_value(laughs),
            Err(PlistError::InternalSubset)
        ));
        let apple = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE plist PUBLIC \
                      \"-//Apple//DTD PLIST 1.0//EN\" \
                      \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
                      <plist version=\"1.0\"><dict><key>a</key><string>b</string></dict></plist>";
        assert!(parse_value(apple).is_ok());
    }

    #[test]
    fn garbage_truncation_and_emptiness_are_errors() {
        assert!(matches!(parse_value(b""), Err(PlistError::Empty)));
        assert!(matches!(parse_value(b"  \n"), Err(PlistError::Empty)));
        assert!(parse_value(b"<plist><dict><key>a</key>").is_err());
        assert!(parse_value(b"<plist><dict><key>a</key></dict></plist>").is_err());
        assert!(parse_value(b"bplist00\x01\x02").is_err());
        assert!(parse_value(&[0xff; 64]).is_err());
    }

    #[test]
    fn xml_and_binary_read_alike_and_as_the_crate_reads_them() {
        let mut dict = Dictionary::new();
        dict.insert("MessageType".into(), "Authenticate".into());
        dict.insert("Token".into(), Value::Data(vec![1, 2, 3]));
        dict.insert("Count".into(), Value::Integer(7.into()));
        dict.insert(
            "List".into(),
            Value::Array(vec![Value::Boolean(true), Value::Real(1.5)]),
        );
        dict.insert(
            "When".into(),
            Value::Date(std::time::SystemTime::UNIX_EPOCH.into()),
        );
        let value = Value::Dictionary(dict);
        let mut binary = Vec::new();
        value.to_writer_binary(&mut binary).unwrap();
        assert_eq!(parse_value(&binary).unwrap(), value);
        assert_eq!(parse_value(&to_xml(&value)).unwrap(), value);
        assert_eq!(Value::from_reader(Cursor::new(&binary)).unwrap(), value);
    }
}
