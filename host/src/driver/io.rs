//! The capabilities a driver may be granted: a Modbus TCP client and a raw
//! TCP connection, each only to an endpoint in the device's grants, each
//! I/O bounded by a timeout, and every write refused once this node's
//! ownership lease ran out ([`Fence`]).
//!
//! In: the device's grants (`modbus-tcp://host:port/unit`,
//! `tcp://host:port`) and the guest's calls. Out: Modbus requests and TCP
//! bytes on the wire, and their answers or an `io-error` value.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_modbus::client::{Context, Reader, Writer};
use wasmtime::component::Resource;

use super::DriverState;
use super::bindings::synod::plugin::io_types::IoError;
use super::bindings::synod::plugin::{modbus, tcp};

/// Largest read a driver may ask of a TCP connection.
const MAX_TCP_READ: u32 = 64 * 1024;

/// What one device may reach.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Grants {
    /// (host:port, unit) pairs for Modbus TCP.
    modbus: Vec<(String, u8)>,
    /// host:port endpoints for raw TCP.
    tcp: Vec<String>,
}

impl Grants {
    /// Parse a definition's grants (checked when the definition was
    /// written; anything unparsable grants nothing).
    pub fn parse(grants: &[String]) -> Grants {
        let mut out = Grants::default();
        for g in grants {
            if let Some(rest) = g.strip_prefix("modbus-tcp://")
                && let Some((endpoint, unit)) = rest.rsplit_once('/')
                && let Ok(unit) = unit.parse()
            {
                out.modbus.push((endpoint.to_owned(), unit));
            } else if let Some(endpoint) = g.strip_prefix("tcp://") {
                out.tcp.push(endpoint.to_owned());
            }
        }
        out
    }

    fn check_modbus(&self, address: &str, unit: u8) -> Result<(), IoError> {
        if self.modbus.iter().any(|(a, u)| a == address && *u == unit) {
            Ok(())
        } else {
            Err(IoError::NotGranted(format!("modbus-tcp://{address}/{unit} is not granted to this device")))
        }
    }

    fn check_tcp(&self, address: &str) -> Result<(), IoError> {
        if self.tcp.iter().any(|a| a == address) {
            Ok(())
        } else {
            Err(IoError::NotGranted(format!("tcp://{address} is not granted to this device")))
        }
    }
}

/// This node's ownership lease: device writes are allowed only before it
/// runs out. Renewed by each committed heartbeat (see `devices::lease`).
#[derive(Debug, Default)]
pub struct Fence {
    until: Mutex<Option<Instant>>,
}

impl Fence {
    /// Extend the lease to `until` (never shortens it).
    pub fn renew(&self, until: Instant) {
        if let Ok(mut u) = self.until.lock()
            && u.is_none_or(|old| old < until)
        {
            *u = Some(until);
        }
    }

    /// Whether writes are allowed now.
    pub fn valid(&self) -> bool {
        self.until.lock().ok().and_then(|u| *u).is_some_and(|u| Instant::now() < u)
    }

    /// Time left on the lease.
    pub fn remaining(&self) -> Duration {
        self.until.lock().ok().and_then(|u| *u).map(|u| u.saturating_duration_since(Instant::now())).unwrap_or_default()
    }
}

/// A Modbus TCP client resource: reconnects lazily after a failure (a
/// timed-out request may still be answered later, so the connection it was
/// on is not reused).
pub struct ModbusClient {
    address: String,
    unit: u8,
    context: Option<Context>,
}

/// A raw TCP connection resource.
pub struct TcpConnection {
    stream: Option<tokio::net::TcpStream>,
}

async fn resolve(address: &str, timeout: Duration) -> Result<std::net::SocketAddr, IoError> {
    match tokio::time::timeout(timeout, tokio::net::lookup_host(address)).await {
        Err(_) => Err(IoError::Timeout),
        Ok(Err(e)) => Err(IoError::Connection(format!("{address}: {e}"))),
        Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| IoError::Connection(format!("{address}: no address"))),
    }
}

fn exception(code: tokio_modbus::ExceptionCode) -> IoError {
    IoError::Exception((u8::from(code), format!("{code}")))
}

impl DriverState {
    fn fenced(&self) -> Result<(), IoError> {
        if self.fence.valid() { Ok(()) } else { Err(IoError::Fenced) }
    }

    /// Run one Modbus request on `client` within the I/O timeout.
    async fn modbus<T>(
        &mut self,
        client: &Resource<ModbusClient>,
        request: impl AsyncFnOnce(&mut Context) -> tokio_modbus::Result<T>,
    ) -> wasmtime::Result<Result<T, IoError>> {
        let timeout = self.io_timeout;
        let c = self.table.get_mut(client)?;
        if c.context.is_none() {
            let addr = match resolve(&c.address, timeout).await {
                Ok(a) => a,
                Err(e) => return Ok(Err(e)),
            };
            let slave = tokio_modbus::Slave(c.unit);
            match tokio::time::timeout(timeout, tokio_modbus::client::tcp::connect_slave(addr, slave)).await {
                Err(_) => return Ok(Err(IoError::Timeout)),
                Ok(Err(e)) => return Ok(Err(IoError::Connection(format!("{}: {e}", c.address)))),
                Ok(Ok(ctx)) => c.context = Some(ctx),
            }
        }
        let Some(ctx) = c.context.as_mut() else { return Ok(Err(IoError::Connection("not connected".into()))) };
        let answer = tokio::time::timeout(timeout, request(ctx)).await;
        Ok(match answer {
            Err(_) => {
                c.context = None;
                Err(IoError::Timeout)
            }
            Ok(Err(e)) => {
                c.context = None;
                Err(IoError::Connection(e.to_string()))
            }
            Ok(Ok(Err(code))) => Err(exception(code)),
            Ok(Ok(Ok(v))) => Ok(v),
        })
    }
}

fn check_count(count: u16, max: u16) -> Result<(), IoError> {
    if count == 0 || count > max {
        return Err(IoError::Invalid(format!("count {count} must be 1..={max}")));
    }
    Ok(())
}

impl modbus::Host for DriverState {
    async fn open(&mut self, address: String, unit: u8) -> wasmtime::Result<Result<Resource<ModbusClient>, IoError>> {
        if let Err(e) = self.grants.check_modbus(&address, unit) {
            return Ok(Err(e));
        }
        Ok(Ok(self.table.push(ModbusClient { address, unit, context: None })?))
    }
}

impl modbus::HostClient for DriverState {
    async fn read_coils(
        &mut self,
        c: Resource<ModbusClient>,
        address: u16,
        count: u16,
    ) -> wasmtime::Result<Result<Vec<bool>, IoError>> {
        if let Err(e) = check_count(count, 2000) {
            return Ok(Err(e));
        }
        self.modbus(&c, async |ctx| ctx.read_coils(address, count).await).await
    }

    async fn read_discrete_inputs(
        &mut self,
        c: Resource<ModbusClient>,
        address: u16,
        count: u16,
    ) -> wasmtime::Result<Result<Vec<bool>, IoError>> {
        if let Err(e) = check_count(count, 2000) {
            return Ok(Err(e));
        }
        self.modbus(&c, async |ctx| ctx.read_discrete_inputs(address, count).await).await
    }

    async fn read_holding_registers(
        &mut self,
        c: Resource<ModbusClient>,
        address: u16,
        count: u16,
    ) -> wasmtime::Result<Result<Vec<u16>, IoError>> {
        if let Err(e) = check_count(count, 125) {
            return Ok(Err(e));
        }
        self.modbus(&c, async |ctx| ctx.read_holding_registers(address, count).await).await
    }

    async fn read_input_registers(
        &mut self,
        c: Resource<ModbusClient>,
        address: u16,
        count: u16,
    ) -> wasmtime::Result<Result<Vec<u16>, IoError>> {
        if let Err(e) = check_count(count, 125) {
            return Ok(Err(e));
        }
        self.modbus(&c, async |ctx| ctx.read_input_registers(address, count).await).await
    }

    async fn write_coil(
        &mut self,
        c: Resource<ModbusClient>,
        address: u16,
        value: bool,
    ) -> wasmtime::Result<Result<(), IoError>> {
        if let Err(e) = self.fenced() {
            return Ok(Err(e));
        }
        self.modbus(&c, async |ctx| ctx.write_single_coil(address, value).await).await
    }

    async fn write_register(
        &mut self,
        c: Resource<ModbusClient>,
        address: u16,
        value: u16,
    ) -> wasmtime::Result<Result<(), IoError>> {
        if let Err(e) = self.fenced() {
            return Ok(Err(e));
        }
        self.modbus(&c, async |ctx| ctx.write_single_register(address, value).await).await
    }

    async fn write_coils(
        &mut self,
        c: Resource<ModbusClient>,
        address: u16,
        values: Vec<bool>,
    ) -> wasmtime::Result<Result<(), IoError>> {
        if let Err(e) = self.fenced().and_then(|()| check_count(values.len().min(65_535) as u16, 1968)) {
            return Ok(Err(e));
        }
        self.modbus(&c, async |ctx| ctx.write_multiple_coils(address, &values).await).await
    }

    async fn write_registers(
        &mut self,
        c: Resource<ModbusClient>,
        address: u16,
        values: Vec<u16>,
    ) -> wasmtime::Result<Result<(), IoError>> {
        if let Err(e) = self.fenced().and_then(|()| check_count(values.len().min(65_535) as u16, 123)) {
            return Ok(Err(e));
        }
        self.modbus(&c, async |ctx| ctx.write_multiple_registers(address, &values).await).await
    }

    async fn drop(&mut self, c: Resource<ModbusClient>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        Ok(())
    }
}

impl tcp::Host for DriverState {
    async fn connect(&mut self, address: String) -> wasmtime::Result<Result<Resource<TcpConnection>, IoError>> {
        if let Err(e) = self.grants.check_tcp(&address) {
            return Ok(Err(e));
        }
        let timeout = self.io_timeout;
        let addr = match resolve(&address, timeout).await {
            Ok(a) => a,
            Err(e) => return Ok(Err(e)),
        };
        let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Err(_) => return Ok(Err(IoError::Timeout)),
            Ok(Err(e)) => return Ok(Err(IoError::Connection(format!("{address}: {e}")))),
            Ok(Ok(s)) => s,
        };
        Ok(Ok(self.table.push(TcpConnection { stream: Some(stream) })?))
    }
}

impl tcp::HostConnection for DriverState {
    async fn write(&mut self, c: Resource<TcpConnection>, bytes: Vec<u8>) -> wasmtime::Result<Result<(), IoError>> {
        if let Err(e) = self.fenced() {
            return Ok(Err(e));
        }
        let timeout = self.io_timeout;
        let conn = self.table.get_mut(&c)?;
        let Some(stream) = conn.stream.as_mut() else { return Ok(Err(IoError::Connection("closed".into()))) };
        Ok(match tokio::time::timeout(timeout, stream.write_all(&bytes)).await {
            Err(_) => {
                conn.stream = None;
                Err(IoError::Timeout)
            }
            Ok(Err(e)) => {
                conn.stream = None;
                Err(IoError::Connection(e.to_string()))
            }
            Ok(Ok(())) => Ok(()),
        })
    }

    async fn read(&mut self, c: Resource<TcpConnection>, max: u32) -> wasmtime::Result<Result<Vec<u8>, IoError>> {
        let timeout = self.io_timeout;
        let conn = self.table.get_mut(&c)?;
        let Some(stream) = conn.stream.as_mut() else { return Ok(Err(IoError::Connection("closed".into()))) };
        let mut buf = vec![0; max.clamp(1, MAX_TCP_READ) as usize];
        Ok(match tokio::time::timeout(timeout, stream.read(&mut buf)).await {
            Err(_) => Err(IoError::Timeout),
            Ok(Err(e)) => {
                conn.stream = None;
                Err(IoError::Connection(e.to_string()))
            }
            Ok(Ok(n)) => {
                buf.truncate(n);
                Ok(buf)
            }
        })
    }

    async fn drop(&mut self, c: Resource<TcpConnection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        Ok(())
    }
}

impl super::bindings::synod::plugin::io_types::Host for DriverState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_name_exact_endpoints() {
        let g = Grants::parse(&["modbus-tcp://127.0.0.1:5020/1".into(), "tcp://10.0.0.2:80".into()]);
        assert!(g.check_modbus("127.0.0.1:5020", 1).is_ok());
        assert!(matches!(g.check_modbus("127.0.0.1:5020", 2), Err(IoError::NotGranted(_))));
        assert!(matches!(g.check_modbus("127.0.0.1:5021", 1), Err(IoError::NotGranted(_))));
        assert!(g.check_tcp("10.0.0.2:80").is_ok());
        assert!(matches!(g.check_tcp("127.0.0.1:5020"), Err(IoError::NotGranted(_))));
    }

    #[test]
    fn a_fence_opens_only_while_the_lease_runs() {
        let f = Fence::default();
        assert!(!f.valid());
        f.renew(Instant::now() + Duration::from_secs(5));
        assert!(f.valid());
        f.renew(Instant::now());
        assert!(f.valid(), "renewing never shortens");
    }
}
