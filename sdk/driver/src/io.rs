//! What device I/O fails with, as text a driver can return from `poll` or
//! `actuate`.
//!
//! In: the `io-error` a host call on a [`crate::modbus::Client`] or
//! [`crate::tcp::Connection`] returns. Out: a message that says what happened.
//! The bindings use this type for WIT `io-types.io-error` (a `with`
//! remapping in `lib.rs`) because the generated one prints as `Debug`.

use std::fmt;

/// Why a Modbus or TCP call failed. Every host I/O has its own timeout, so a
/// dead device is an error value, never a hang.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoError {
    /// The endpoint is not among the device's grants.
    NotGranted(String),
    /// The connection failed or was closed.
    Connection(String),
    /// No answer within the host's I/O timeout.
    Timeout,
    /// The device answered with a Modbus exception (its code and name).
    Exception((u8, String)),
    /// This node no longer holds the device's lease: it may not write.
    Fenced,
    /// A bad argument (too many registers, an empty write).
    Invalid(String),
}

impl IoError {
    /// The connection is gone (closed, refused, or silent past the timeout):
    /// open a new client before the next request. Every other error leaves
    /// the connection usable.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, IoError::Connection(_) | IoError::Timeout)
    }
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::NotGranted(what) => write!(f, "not granted to this device: {what}"),
            IoError::Connection(why) => write!(f, "connection failed: {why}"),
            IoError::Timeout => f.write_str("timed out: no answer within the host's I/O timeout"),
            IoError::Exception((code, name)) => write!(f, "Modbus exception {code} ({name})"),
            IoError::Fenced => f.write_str("fenced: this node no longer holds the device's lease"),
            IoError::Invalid(why) => write!(f, "invalid request: {why}"),
        }
    }
}

impl std::error::Error for IoError {}

#[cfg(test)]
mod tests {
    use super::IoError;

    #[test]
    fn messages_name_the_cause() {
        assert_eq!(IoError::Connection("refused".into()).to_string(), "connection failed: refused");
        assert_eq!(
            IoError::Exception((2, "illegal data address".into())).to_string(),
            "Modbus exception 2 (illegal data address)"
        );
        assert_eq!(IoError::NotGranted("127.0.0.1:1".into()).to_string(), "not granted to this device: 127.0.0.1:1");
        assert_eq!(IoError::Timeout.to_string(), "timed out: no answer within the host's I/O timeout");
    }

    #[test]
    fn only_connection_and_timeout_lose_the_connection() {
        assert!(IoError::Connection(String::new()).is_connection_lost());
        assert!(IoError::Timeout.is_connection_lost());
        assert!(!IoError::Exception((1, String::new())).is_connection_lost());
        assert!(!IoError::Fenced.is_connection_lost());
        assert!(!IoError::NotGranted(String::new()).is_connection_lost());
        assert!(!IoError::Invalid(String::new()).is_connection_lost());
    }
}
