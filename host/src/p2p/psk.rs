//! The private-network handshake: both ends of a new TCP connection prove
//! they hold the cluster's `network_key` before anything else is spoken.
//!
//! In: a raw socket and the 32-byte key. Out: the same socket, once the
//! peer proved the key; an error (and the connection dropped) otherwise, so
//! a process without the key never reaches noise, protocol negotiation or
//! any handler.
//!
//! Each side sends a fresh 32-byte nonce, then a BLAKE3 MAC keyed with the
//! network key over both nonces (its own first), and checks the other's
//! MAC. Fresh nonces on both sides make a recorded proof useless on another
//! connection. After the proof the stream is left as it is: noise, next,
//! encrypts and authenticates it with the node keys.
//!
//! Why not libp2p's pnet, which this replaced: pnet also encrypts every
//! byte with XSalsa20 under noise, and with libp2p-pnet 0.27 a burst of
//! 1 MiB commands stalled replication (appends timed out, 26 of 40 commands
//! failed in `safety::a_burst_of_large_commands_replicates_without_elections`,
//! which passes with this handshake). Admission is what the key is for;
//! confidentiality and integrity are noise's.

use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How long the peer may take to prove the key.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);

/// Domain separation for the MAC.
const CONTEXT: &[u8] = b"synod private network v1";

/// The MAC `sender` sends, over both nonces.
fn proof(key: &[u8; 32], sender: &[u8; 32], receiver: &[u8; 32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(CONTEXT);
    h.update(sender);
    h.update(receiver);
    h.finalize()
}

/// Prove the key to the peer and check its proof; the socket, untouched
/// otherwise.
pub(super) async fn handshake<S>(key: [u8; 32], mut socket: S) -> std::io::Result<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        let mut ours = [0u8; 32];
        getrandom::fill(&mut ours).map_err(|e| std::io::Error::other(format!("no randomness: {e}")))?;
        socket.write_all(&ours).await?;
        socket.flush().await?;
        let mut theirs = [0u8; 32];
        socket.read_exact(&mut theirs).await?;
        socket.write_all(proof(&key, &ours, &theirs).as_bytes()).await?;
        socket.flush().await?;
        let mut mac = [0u8; 32];
        socket.read_exact(&mut mac).await?;
        // blake3::Hash compares in constant time.
        if blake3::Hash::from(mac) != proof(&key, &theirs, &ours) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the peer does not hold this cluster's network_key",
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(HANDSHAKE_DEADLINE, exchange).await {
        Ok(Ok(())) => Ok(socket),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the private network handshake timed out")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(a: [u8; 32], b: [u8; 32]) -> (std::io::Result<()>, std::io::Result<()>) {
        let (x, y) = tokio::io::duplex(1024);
        use tokio_util_compat::Compat;
        let (x, y) = (Compat::new(x), Compat::new(y));
        let (l, r) = tokio::join!(handshake(a, x), handshake(b, y));
        (l.map(|_| ()), r.map(|_| ()))
    }

    mod tokio_util_compat {
        //! A tokio duplex as a futures stream, for the tests only.
        use std::pin::Pin;
        use std::task::{Context, Poll};
        pub struct Compat<T>(T);
        impl<T> Compat<T> {
            pub fn new(t: T) -> Self {
                Compat(t)
            }
        }
        impl<T: tokio::io::AsyncRead + Unpin> futures::AsyncRead for Compat<T> {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut [u8],
            ) -> Poll<std::io::Result<usize>> {
                let mut b = tokio::io::ReadBuf::new(buf);
                match Pin::new(&mut self.0).poll_read(cx, &mut b) {
                    Poll::Ready(Ok(())) => Poll::Ready(Ok(b.filled().len())),
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
        impl<T: tokio::io::AsyncWrite + Unpin> futures::AsyncWrite for Compat<T> {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.0).poll_write(cx, buf)
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_flush(cx)
            }
            fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_shutdown(cx)
            }
        }
    }

    #[tokio::test]
    async fn the_same_key_passes_another_fails_on_both_sides() {
        let (l, r) = pair([7; 32], [7; 32]).await;
        assert!(l.is_ok() && r.is_ok(), "{l:?} {r:?}");
        let (l, r) = pair([7; 32], [8; 32]).await;
        assert_eq!(l.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
        assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
    }
}
