//! Reading a driver's profile with errors that name the field.
//!
//! In: [`crate::Device::profile`], the device definition's JSON, which only
//! the driver understands. Out: typed values, or a [`ProfileError`] such as
//! ``profile field `temperature.table` must be one of "input", "holding"
//! (got "coil")`` that `init` can return as it is. Keys a driver does not ask
//! for are ignored: a profile may carry settings the host reads (`report`
//! deadbands) or that a newer driver understands.

use std::fmt;
use std::ops::RangeInclusive;

use serde_json::{Map, Value};

/// A profile field that is missing or wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileError {
    /// The dotted path of the field (`temperature.scale`); empty for the
    /// profile itself.
    pub field: String,
    /// What is wrong, as the end of a sentence ("must be a number").
    pub reason: String,
}

impl fmt::Display for ProfileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "profile {}", self.reason)
        } else {
            write!(f, "profile field `{}` {}", self.field, self.reason)
        }
    }
}

impl std::error::Error for ProfileError {}

/// Parse the profile text; an empty profile is an empty object.
pub fn parse(profile: &str) -> Result<Value, ProfileError> {
    if profile.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_str(profile)
        .map_err(|e| ProfileError { field: String::new(), reason: format!("is not valid JSON: {e}") })
}

/// One JSON object of the profile (the profile itself, or a nested point),
/// with the path that errors name.
#[derive(Debug, Clone)]
pub struct Section<'a> {
    path: String,
    fields: &'a Map<String, Value>,
}

/// What `value` is, for messages.
fn kind(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

impl<'a> Section<'a> {
    /// The whole profile, which must be a JSON object.
    pub fn root(profile: &'a Value) -> Result<Self, ProfileError> {
        match profile {
            Value::Object(fields) => Ok(Section { path: String::new(), fields }),
            other => Err(ProfileError {
                field: String::new(),
                reason: format!("must be a JSON object (got {})", kind(other)),
            }),
        }
    }

    /// The dotted path of `key` in this section.
    pub fn field(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_string() } else { format!("{}.{key}", self.path) }
    }

    /// An error about `key`, which names its full path.
    pub fn error(&self, key: &str, reason: impl Into<String>) -> ProfileError {
        ProfileError { field: self.field(key), reason: reason.into() }
    }

    /// The raw value of `key`, if present and not `null`.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.fields.get(key).filter(|v| !v.is_null())
    }

    /// The nested object at `key`, which must be there.
    pub fn section(&self, key: &str) -> Result<Section<'a>, ProfileError> {
        match self.get(key) {
            Some(Value::Object(fields)) => Ok(Section { path: self.field(key), fields }),
            Some(other) => Err(self.error(key, format!("must be a JSON object (got {})", kind(other)))),
            None => Err(self.error(key, "is missing")),
        }
    }

    /// A string field.
    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ProfileError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.error(key, format!("must be a string (got {})", kind(other)))),
        }
    }

    /// A field whose value is one of the names in `choices`.
    pub fn choice<T: Copy>(&self, key: &str, choices: &[(&str, T)]) -> Result<Option<T>, ProfileError> {
        let Some(name) = self.str(key)? else { return Ok(None) };
        match choices.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => Ok(Some(*v)),
            None => {
                let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
                Err(self.error(key, format!("must be one of {} (got {name:?})", names.join(", "))))
            }
        }
    }

    /// A finite number.
    pub fn number(&self, key: &str) -> Result<Option<f64>, ProfileError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(n) if n.is_finite() => Ok(Some(n)),
                _ => Err(self.error(key, format!("must be a number (got {})", kind(v)))),
            },
        }
    }

    /// A whole number within `range`.
    pub fn integer(&self, key: &str, range: RangeInclusive<u64>) -> Result<Option<u64>, ProfileError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if range.contains(&n) => Ok(Some(n)),
                _ => Err(self
                    .error(key, format!("must be a whole number {}-{} (got {})", range.start(), range.end(), kind(v)))),
            },
        }
    }

    /// A boolean field.
    pub fn bool(&self, key: &str) -> Result<Option<bool>, ProfileError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.error(key, format!("must be true or false (got {})", kind(other)))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Section, parse};

    #[test]
    fn errors_name_the_field_and_what_was_found() {
        let profile =
            parse(r#"{"temperature": {"table": "coil", "address": -1, "scale": "x"}, "poll_ms": 20}"#).unwrap();
        let root = Section::root(&profile).unwrap();
        let t = root.section("temperature").unwrap();
        let table = t.choice("table", &[("input", 4), ("holding", 3)]).map_err(|e| e.to_string());
        assert_eq!(
            table,
            Err(r#"profile field `temperature.table` must be one of "input", "holding" (got "coil")"#.into())
        );
        let address = t.integer("address", 0..=65535).map_err(|e| e.to_string());
        assert_eq!(address, Err("profile field `temperature.address` must be a whole number 0-65535 (got -1)".into()));
        let scale = t.number("scale").map_err(|e| e.to_string());
        assert_eq!(scale, Err(r#"profile field `temperature.scale` must be a number (got "x")"#.into()));
        assert_eq!(t.number("offset"), Ok(None));
        let heater = root.section("heater").map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(heater, Err("profile field `heater` is missing".into()));
        assert_eq!(root.integer("poll_ms", 0..=100), Ok(Some(20)));
    }

    #[test]
    fn the_profile_must_be_an_object() {
        assert_eq!(parse("  ").unwrap(), serde_json::json!({}));
        let not_json = parse("{").unwrap_err().to_string();
        assert!(not_json.starts_with("profile is not valid JSON: "), "{not_json}");
        let list = parse("[1]").unwrap();
        let err = Section::root(&list).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(err, Err("profile must be a JSON object (got [1])".into()));
    }
}
