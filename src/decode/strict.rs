//! The strict reader: serde_json's parser driven by the schema. Syntax errors are serde_json's
//! (with line and column), values of schema fields land in typed slots through
//! [`Value`], other keys are skipped (their nesting bounded by serde_json's recursion limit).
//! Nothing is allocated per key or per value unless a string holds escapes. It reads every
//! record the flat reader declines, and alone words syntax errors.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Reason;
use super::field::{FieldSpec, Slot, Value};

const NOT_OBJECT: &str = "\u{0}not an object";

/// The reason for a record serde_json refused.
pub(super) fn reason(text: &str, e: serde_json::Error) -> Reason {
    let msg = e.to_string();
    if let Some(rest) = msg.strip_prefix(NOT_OBJECT) {
        Reason::NotAnObject(rest.trim().to_string())
    } else if e.is_data() {
        Reason::WrongType(msg)
    } else if msg.starts_with("trailing characters") {
        let values = serde_json::Deserializer::from_str(text).into_iter::<IgnoredAny>();
        match values.collect::<Result<Vec<_>, _>>() {
            Ok(v) if v.len() > 1 => Reason::MultipleValues(v.len()),
            _ => Reason::InvalidJson(msg),
        }
    } else {
        Reason::InvalidJson(msg)
    }
}

/// The top-level object.
pub(super) struct Record<'s, 'a> {
    pub fields: &'s [FieldSpec],
    pub slots: &'s mut [Slot<'a>],
    /// The first field whose value has the wrong type; reading goes on, so a syntax
    /// error later in the record still wins.
    pub wrong: &'s mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Record<'_, 'de> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Record<'_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Record {
            fields,
            slots,
            wrong,
        } = self;
        // Records usually list their fields in one order: try the one after the last.
        let mut guess = 0;
        while let Some(key) = map.next_key_seed(Key { fields, guess })? {
            match key {
                Some(i) => {
                    guess = i + 1;
                    slots[i] = map.next_value_seed(Value {
                        field: &fields[i],
                        wrong: &mut *wrong,
                    })?;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(format!("{NOT_OBJECT} got an array")))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT} got a string")))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT} got a boolean")))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT} got a number")))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT} got a number")))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT} got a number")))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(format!("{NOT_OBJECT} got null")))
    }
}

/// A key: the index of its schema field, if it has one.
struct Key<'s> {
    fields: &'s [FieldSpec],
    guess: usize,
}

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        if self.fields.get(self.guess).is_some_and(|f| f.name == key) {
            return Ok(Some(self.guess));
        }
        Ok(self.fields.iter().position(|f| f.name == key))
    }
}

impl<'de> DeserializeSeed<'de> for Value<'_> {
    type Value = Slot<'de>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Slot<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Value<'_> {
    type Value = Slot<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.field.kind.expected())
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Slot<'de>, E> {
        Ok(self.text(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Slot<'de>, E> {
        Ok(self.text(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Slot<'de>, E> {
        Ok(self.text(Cow::Owned(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Slot<'de>, E> {
        Ok(self.int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Slot<'de>, E> {
        Ok(self.uint(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Slot<'de>, E> {
        Ok(self.float(v))
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Slot<'de>, E> {
        Ok(self.boolean(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Slot<'de>, E> {
        Ok(Slot::Absent)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(self.mismatch("an object"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slot<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.mismatch("an array"))
    }
}
