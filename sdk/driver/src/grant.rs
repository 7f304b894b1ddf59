//! The endpoints a device was granted, as a driver reads them.
//!
//! In: the strings in [`crate::Device::grants`], `modbus-tcp://host:port/unit`
//! or `tcp://host:port`. Out: the address and unit to hand to
//! [`crate::modbus::open`] or [`crate::tcp::connect`]. The host checks every
//! open against the grants again; parsing here only lets a driver find its
//! endpoint and fail `init` with a clear message.

use std::fmt;
use std::str::FromStr;

/// One granted endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// `modbus-tcp://host:port/unit`.
    ModbusTcp {
        /// `host:port`, as [`crate::modbus::open`] takes it.
        address: String,
        /// The Modbus unit id.
        unit: u8,
    },
    /// `tcp://host:port`.
    Tcp {
        /// `host:port`, as [`crate::tcp::connect`] takes it.
        address: String,
    },
}

/// A grant that could not be read, or a missing one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantError(String);

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GrantError {}

const MODBUS_TCP: &str = "modbus-tcp://";
const TCP: &str = "tcp://";

impl FromStr for Grant {
    type Err = GrantError;

    fn from_str(grant: &str) -> Result<Self, GrantError> {
        let bad = |why: &str| GrantError(format!("grant `{grant}`: {why}"));
        if let Some(rest) = grant.strip_prefix(MODBUS_TCP) {
            let (address, unit) = rest.rsplit_once('/').ok_or_else(|| bad("expected modbus-tcp://host:port/unit"))?;
            check_address(address).map_err(bad)?;
            let unit = unit.parse::<u8>().map_err(|_| bad("the unit id must be a number 0-255"))?;
            Ok(Grant::ModbusTcp { address: address.to_string(), unit })
        } else if let Some(address) = grant.strip_prefix(TCP) {
            check_address(address).map_err(bad)?;
            Ok(Grant::Tcp { address: address.to_string() })
        } else {
            Err(bad("expected modbus-tcp://host:port/unit or tcp://host:port"))
        }
    }
}

/// `host:port` with a non-empty host and a port 1-65535 (`[v6]:port` too).
fn check_address(address: &str) -> Result<(), &'static str> {
    let (host, port) = address.rsplit_once(':').ok_or("expected host:port")?;
    if host.is_empty() || host.contains('/') {
        return Err("expected host:port");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("the port must be a number 1-65535"),
    }
}

/// The first `modbus-tcp://` grant in `grants`, parsed: the address and unit
/// a Modbus driver opens. An error names the bad grant, or says there is
/// none.
pub fn modbus_tcp(grants: &[String]) -> Result<(String, u8), GrantError> {
    let Some(grant) = grants.iter().find(|g| g.starts_with(MODBUS_TCP)) else {
        return Err(GrantError(format!("no grant of the form modbus-tcp://host:port/unit among {grants:?}")));
    };
    match grant.parse()? {
        Grant::ModbusTcp { address, unit } => Ok((address, unit)),
        Grant::Tcp { .. } => Err(GrantError(format!("grant `{grant}` is not a modbus-tcp grant"))),
    }
}

#[cfg(test)]
mod tests {
    use super::{Grant, modbus_tcp};

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            "modbus-tcp://127.0.0.1:5020/7".parse::<Grant>(),
            Ok(Grant::ModbusTcp { address: "127.0.0.1:5020".into(), unit: 7 })
        );
        assert_eq!("tcp://plc.local:80".parse::<Grant>(), Ok(Grant::Tcp { address: "plc.local:80".into() }));
        assert_eq!(
            "modbus-tcp://[::1]:502/0".parse::<Grant>(),
            Ok(Grant::ModbusTcp { address: "[::1]:502".into(), unit: 0 })
        );
    }

    #[test]
    fn refuses_malformed_grants_naming_them() {
        for (grant, why) in [
            ("modbus-tcp://127.0.0.1:502", "expected modbus-tcp://host:port/unit"),
            ("modbus-tcp://127.0.0.1:502/256", "the unit id must be a number 0-255"),
            ("modbus-tcp://127.0.0.1/1", "expected host:port"),
            ("modbus-tcp://:502/1", "expected host:port"),
            ("tcp://host:0", "the port must be a number 1-65535"),
            ("serial:///dev/ttyUSB0", "expected modbus-tcp://host:port/unit or tcp://host:port"),
        ] {
            let err = grant.parse::<Grant>().err().map(|e| e.to_string());
            assert_eq!(err, Some(format!("grant `{grant}`: {why}")), "{grant}");
        }
    }

    #[test]
    fn finds_the_first_modbus_grant() {
        let grants = vec!["tcp://a:1".to_string(), "modbus-tcp://b:2/3".into(), "modbus-tcp://c:4/5".into()];
        assert_eq!(modbus_tcp(&grants), Ok(("b:2".to_string(), 3)));
        let none = modbus_tcp(&["tcp://a:1".to_string()]).err().map(|e| e.to_string());
        assert_eq!(none.as_deref(), Some(r#"no grant of the form modbus-tcp://host:port/unit among ["tcp://a:1"]"#));
    }
}
