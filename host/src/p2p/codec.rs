//! The wire format of `/synod/raft/1` and `/synod/blob/1`: one opaque
//! message per direction, framed as a u32 big-endian length then the bytes.
//!
//! In: a request or response as bytes (outbound), or a libp2p stream
//! (inbound). Out: the same bytes on the other side. Both directions enforce
//! the protocol's size cap, so a peer can neither make this node buffer an
//! unbounded message nor be sent one it would refuse anyway.

use std::io;

use futures::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use libp2p::StreamProtocol;
use libp2p::request_response;

/// Length-prefixed opaque bytes with a size cap, for one protocol.
#[derive(Debug, Clone)]
pub(crate) struct FrameCodec {
    /// Largest request or response accepted or sent, in bytes.
    limit: usize,
}

impl FrameCodec {
    /// A codec refusing messages over `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Self { limit }
    }
}

/// Reads one frame of at most `limit` bytes.
async fn read_frame<T>(io: &mut T, limit: usize, protocol: &StreamProtocol, what: &str) -> io::Result<Vec<u8>>
where
    T: AsyncRead + Unpin + Send,
{
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = u32::from_be_bytes(prefix);
    let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
    if len_usize > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("incoming {protocol} {what} of {len} bytes is over the limit of {limit} bytes"),
        ));
    }
    // One zeroed allocation: large ones come from the OS as untouched
    // pages, so a peer that announces a big frame and sends nothing costs
    // address space, not memory; and reading into a sized buffer avoids
    // the per-chunk growth of `read_to_end`.
    let mut buf = vec![0u8; len_usize];
    io.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("{protocol} {what} of {len} bytes ended early"))
        } else {
            e
        }
    })?;
    Ok(buf)
}

/// Writes one frame, refusing `bytes` over `limit`.
async fn write_frame<T>(io: &mut T, bytes: &[u8], limit: usize, protocol: &StreamProtocol, what: &str) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
{
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("outgoing {protocol} {what} of {} bytes is over the limit of {limit} bytes", bytes.len()),
        )
    };
    if bytes.len() > limit {
        return Err(too_large());
    }
    // The prefix is 32 bits whatever the configured limit.
    let len = u32::try_from(bytes.len()).map_err(|_| too_large())?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.flush().await
}

impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, protocol: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.limit, protocol, "request").await
    }

    async fn read_response<T>(&mut self, protocol: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.limit, protocol, "response").await
    }

    async fn write_request<T>(&mut self, protocol: &StreamProtocol, io: &mut T, req: Vec<u8>) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.limit, protocol, "request").await
    }

    async fn write_response<T>(&mut self, protocol: &StreamProtocol, io: &mut T, res: Vec<u8>) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.limit, protocol, "response").await
    }
}

#[cfg(test)]
mod tests {
    use futures::io::Cursor;
    use libp2p::request_response::Codec as _;

    use super::*;

    const PROTO: StreamProtocol = StreamProtocol::new("/synod/raft/1");

    #[tokio::test]
    async fn round_trip_is_length_prefixed_big_endian() {
        let mut codec = FrameCodec::new(16);
        let mut wire = Cursor::new(Vec::new());
        codec.write_request(&PROTO, &mut wire, b"hello".to_vec()).await.unwrap();
        assert_eq!(wire.get_ref().as_slice(), b"\0\0\0\x05hello");

        let mut wire = Cursor::new(wire.into_inner());
        assert_eq!(codec.read_request(&PROTO, &mut wire).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn empty_message_round_trips() {
        let mut codec = FrameCodec::new(16);
        let mut wire = Cursor::new(Vec::new());
        codec.write_response(&PROTO, &mut wire, Vec::new()).await.unwrap();
        let mut wire = Cursor::new(wire.into_inner());
        assert_eq!(codec.read_response(&PROTO, &mut wire).await.unwrap(), Vec::<u8>::new());
    }

    #[tokio::test]
    async fn oversized_write_is_refused_before_anything_is_sent() {
        let mut codec = FrameCodec::new(4);
        let mut wire = Cursor::new(Vec::new());
        let err = codec.write_request(&PROTO, &mut wire, vec![0; 5]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(err.to_string(), "outgoing /synod/raft/1 request of 5 bytes is over the limit of 4 bytes");
        assert!(wire.get_ref().is_empty());
    }

    #[tokio::test]
    async fn oversized_read_is_refused_from_the_prefix() {
        let mut codec = FrameCodec::new(4);
        // Only the prefix: the cap must be checked before waiting for bytes.
        let mut wire = Cursor::new(1_000_000u32.to_be_bytes().to_vec());
        let err = codec.read_response(&PROTO, &mut wire).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(err.to_string(), "incoming /synod/raft/1 response of 1000000 bytes is over the limit of 4 bytes");
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let mut codec = FrameCodec::new(16);
        let mut wire = Cursor::new(b"\0\0\0\x08abc".to_vec());
        let err = codec.read_request(&PROTO, &mut wire).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(err.to_string(), "/synod/raft/1 request of 8 bytes ended early");
    }
}
