//! The network side: tokio-modbus's TCP server, one [`RoomService`] per
//! connection, and the faults applied before a request reaches the register map.
//!
//! In: TCP connections carrying Modbus requests (any unit id). Out: responses,
//! exceptions, silence or a closed connection, as the faults say.

use std::future::{Future, ready};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response};

use super::{Fault, Simulation, registers};

/// Pause before listening again after `accept` failed (e.g. out of file descriptors).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Accepts connections on `listener` until the task running this is aborted.
///
/// Dropping this future drops tokio-modbus's `serve` future, which cancels
/// every connection task it spawned.
pub(crate) async fn serve(listener: TcpListener, sim: Arc<Simulation>) {
    let server = Server::new(listener);
    let on_connected = |stream: TcpStream, peer: SocketAddr| {
        let sim = Arc::clone(&sim);
        async move { Ok::<_, io::Error>(accept(sim, stream, peer)) }
    };
    loop {
        // `serve` returns only when `accept` fails, and then it has already
        // cancelled its connections; listening again is the best left to do.
        match server.serve(&on_connected, report_process_error).await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(%err, "modbus simulator: accepting a connection failed; listening again");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

/// The service and transport for a new connection, or `None` once the
/// simulator is shutting down.
fn accept(sim: Arc<Simulation>, stream: TcpStream, peer: SocketAddr) -> Option<(RoomService, Connection)> {
    let open = sim.connection_guard()?;
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, %peer, "modbus simulator: cannot set TCP_NODELAY");
    }
    tracing::debug!(%peer, "modbus simulator: connection accepted");
    let closed = Arc::new(AtomicBool::new(false));
    Some((RoomService { sim, closed: Arc::clone(&closed) }, Connection { stream, closed, _open: open }))
}

fn report_process_error(err: io::Error) {
    tracing::debug!(%err, "modbus simulator: connection ended with an error");
}

/// Serves the requests of one connection.
pub(crate) struct RoomService {
    /// The rooms, faults and counters shared by every connection.
    sim: Arc<Simulation>,
    /// Set by a `Disconnect` fault; the [`Connection`] then reads end-of-file,
    /// which makes tokio-modbus end the connection and drop the socket.
    closed: Arc<AtomicBool>,
}

/// A response: `None` sends nothing (the `Drop` and `Disconnect` faults).
type Reply = Result<Option<Response>, ExceptionCode>;

impl Service for RoomService {
    type Request = Request<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Reply> + Send>>;

    fn call(&self, request: Request<'static>) -> Self::Future {
        if self.closed.load(Ordering::Acquire) {
            // Requests the client pipelined behind the one that closed the connection.
            return Box::pin(ready(Ok(None)));
        }
        self.sim.count_request();
        let fault = {
            let mut state = self.sim.state();
            for index in registers::coil_write_rooms(&request) {
                if let Some(room) = state.rooms.get_mut(index) {
                    room.coil_writes += 1;
                }
            }
            state.fault_for(registers::first_room(&request))
        };
        match fault {
            Fault::None => Box::pin(ready(self.sim.apply(&request).map(Some))),
            Fault::Delay(delay) => {
                let sim = Arc::clone(&self.sim);
                // The request takes effect when it is answered, as on a slow device.
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    sim.apply(&request).map(Some)
                })
            }
            Fault::Drop => Box::pin(ready(Ok(None))),
            Fault::Exception(code) => Box::pin(ready(Err(ExceptionCode::new(code)))),
            Fault::Disconnect => {
                self.closed.store(true, Ordering::Release);
                Box::pin(ready(Ok(None)))
            }
        }
    }
}

/// The TCP stream of one connection, which a `Disconnect` fault can end.
///
/// tokio-modbus gives a service no way to close its connection; its request
/// loop ends when the transport reads end-of-file, so this transport reports
/// end-of-file once `closed` is set.
pub(crate) struct Connection {
    /// The client's socket.
    stream: TcpStream,
    /// Shared with the connection's [`RoomService`].
    closed: Arc<AtomicBool>,
    /// Held while the connection lives, so shutdown can wait for all to close.
    _open: mpsc::Sender<()>,
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closed.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
