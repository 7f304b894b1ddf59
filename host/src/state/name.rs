//! Names of plugins, commands and queries.
//!
//! They appear in URLs (`/v1/commands/{plugin}/{command}`) and NATS subjects
//! (`synod.cmd.<plugin>.<command>`), so they are restricted to what is safe
//! in both: 1–64 bytes of `a-z`, `0-9`, `_` and `-`, starting with a letter.

/// Longest name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// Why a name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Not UTF-8 at all.
    #[error("{kind} name is not valid UTF-8")]
    NotUtf8 {
        /// "plugin", "command" or "query".
        kind: &'static str,
    },
    /// Outside the allowed alphabet or length.
    #[error(
        "{kind} name {name:?} is invalid: use 1-{MAX_NAME_BYTES} characters of a-z, 0-9, _ \
         and -, starting with a letter"
    )]
    Invalid {
        /// "plugin", "command" or "query".
        kind: &'static str,
        /// The name as offered (lossily decoded).
        name: String,
    },
}

/// Check raw bytes as a name of `kind`, returning it as text.
pub fn parse_name<'a>(kind: &'static str, raw: &'a [u8]) -> Result<&'a str, NameError> {
    let name = std::str::from_utf8(raw).map_err(|_| NameError::NotUtf8 { kind })?;
    check_name(kind, name)?;
    Ok(name)
}

/// Check text as a name of `kind`.
pub fn check_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.as_bytes()[0].is_ascii_lowercase()
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok { Ok(()) } else { Err(NameError::Invalid { kind, name: name.to_owned() }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("command", b"set_setpoint"), Ok("set_setpoint"));
        assert!(matches!(parse_name("plugin", b"ab\xff"), Err(NameError::NotUtf8 { .. })));
        for bad in ["", "Upper", "1st", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(check_name("plugin", bad).is_err(), "{bad:?}");
        }
        let msg = check_name("command", "a.b").unwrap_err().to_string();
        assert!(msg.contains("command name \"a.b\" is invalid"), "{msg}");
    }
}
