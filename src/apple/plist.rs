//! Property lists from devices: XML or binary, parsed strictly and bounded. Building,
//! deserialising and dropping a nested value all recurse, so nesting is measured first, by a
//! visitor that stops at [`MAX_DEPTH`] before the stack can grow further.

use std::fmt;
use std::io::Cursor;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

/// Deepest nesting accepted. Apple's messages nest a handful of levels (a DeviceInformation
/// result: dict → QueryResponses → a dict of dicts); 32 leaves ample room.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PlistError {
    #[error("the body is empty")]
    Empty,
    #[error("the property list nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("not a property list: {0}")]
    Malformed(String),
    #[error("the property list does not have the expected shape: {0}")]
    Shape(String),
}

const TOO_DEEP: &str = "nesting limit exceeded";

/// Checks that `body` is a well-formed XML or binary plist no deeper than [`MAX_DEPTH`].
pub fn check(body: &[u8]) -> Result<(), PlistError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(PlistError::Empty);
    }
    plist::from_bytes::<Checked>(body).map(|_| ()).map_err(|e| {
        if e.to_string().contains(TOO_DEEP) {
            PlistError::TooDeep
        } else {
            PlistError::Malformed(e.to_string())
        }
    })
}

/// A plist that was walked to the end within [`MAX_DEPTH`].
struct Checked;

impl<'de> de::Deserialize<'de> for Checked {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Depth(0).deserialize(deserializer).map(|()| Checked)
    }
}

/// Walks any value without keeping it, failing past [`MAX_DEPTH`].
struct Depth(usize);

impl<'de> DeserializeSeed<'de> for Depth {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Depth {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a property list value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }
    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested::<A::Error>()?;
        while seq.next_element_seed(Depth(inner))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested::<A::Error>()?;
        while map.next_key_seed(Depth(inner))?.is_some() {
            map.next_value_seed(Depth(inner))?;
        }
        Ok(())
    }
}

impl Depth {
    fn nested<E: de::Error>(&self) -> Result<usize, E> {
        if self.0 >= MAX_DEPTH {
            return Err(E::custom(TOO_DEEP));
        }
        Ok(self.0 + 1)
    }
}

/// Parses a plist into a value after [`check`].
pub fn parse_value(body: &[u8]) -> Result<plist::Value, PlistError> {
    check(body)?;
    plist::Value::from_reader(Cursor::new(body)).map_err(|e| PlistError::Malformed(e.to_string()))
}

/// XML text of a value (what the broker sends: every Apple client reads XML).
pub fn to_xml(value: &plist::Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail for a value we built.
    if value.to_writer_xml(&mut out).is_err() {
        out.clear();
    }
    out
}

#[cfg(test)]
mod tests {
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
        assert!(check(&nested(MAX_DEPTH)).is_ok());
        assert!(matches!(
            check(&nested(MAX_DEPTH + 1)),
            Err(PlistError::TooDeep)
        ));
        // Deep enough to overflow the stack if it were built and dropped.
        assert!(matches!(
            parse_value(&nested(200_000)),
            Err(PlistError::TooDeep)
        ));
    }

    #[test]
    fn garbage_truncation_and_emptiness_are_errors() {
        assert!(matches!(check(b""), Err(PlistError::Empty)));
        assert!(matches!(check(b"  \n"), Err(PlistError::Empty)));
        assert!(check(b"<plist><dict><key>a</key>").is_err());
        assert!(check(b"bplist00\x01\x02").is_err());
        assert!(check(&[0xff; 64]).is_err());
    }

    #[test]
    fn xml_and_binary_read_alike() {
        let mut dict = plist::Dictionary::new();
        dict.insert("MessageType".into(), "Authenticate".into());
        let value = plist::Value::Dictionary(dict);
        let mut binary = Vec::new();
        value.to_writer_binary(&mut binary).unwrap();
        assert_eq!(parse_value(&binary).unwrap(), value);
        assert_eq!(parse_value(&to_xml(&value)).unwrap(), value);
    }
}
