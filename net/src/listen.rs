//! Accepting TCP connections for a server (the coordinator's HTTP and gRPC APIs, a
//! worker's control service), at most so many open at once, so what peers open cannot
//! exhaust a node's file descriptors or memory. One past the most is told so (an HTTP
//! server can give the bytes of a 503) and closed at once, rather than left hanging. Each connection gets no Nagle delay on small writes, and a
//! server that streams tokens can ask for a small kernel send buffer, so a client that
//! stops reading is noticed after tens of kilobytes rather than the megabytes the kernel
//! would otherwise buffer for it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

/// A listener that holds at most so many connections open.
pub struct Bounded {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    send_buffer: Option<usize>,
    /// What a connection past the most is told before it is closed.
    refusal: Vec<u8>,
}

/// An accepted connection; closing it lets another in.
pub struct Connection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Bounded {
    /// Bounds `listener` to `most` connections open at once.
    pub fn new(listener: TcpListener, most: usize) -> Self {
        Bounded {
            listener,
            permits: Arc::new(Semaphore::new(most)),
            send_buffer: None,
            refusal: Vec::new(),
        }
    }

    /// Writes `bytes` to a connection past the most before closing it (an HTTP 503, say).
    pub fn with_refusal(mut self, bytes: Vec<u8>) -> Self {
        self.refusal = bytes;
        self
    }

    /// Gives each connection a kernel send buffer of `bytes` (the kernel doubles it for
    /// its bookkeeping).
    pub fn with_send_buffer(mut self, bytes: usize) -> Self {
        self.send_buffer = Some(bytes);
        self
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection within the most; those past it are refused meanwhile. Accept
    /// errors (out of file descriptors, a connection reset before it was taken) are
    /// logged and retried.
    pub async fn next(&mut self) -> (Connection, SocketAddr) {
        loop {
            let (stream, addr) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(cause = %e, "could not accept a connection; retrying");
                    // Out of descriptors frees up only as connections close: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                debug!(peer = %addr, "refused a connection: the most are open");
                // A fresh socket's send buffer takes a short answer whole; if not, the
                // peer still sees the connection close.
                if !self.refusal.is_empty() {
                    let _ = stream.try_write(&self.refusal);
                }
                continue;
            };
            prepare(&stream, self.send_buffer);
            return (
                Connection {
                    stream,
                    _permit: permit,
                },
                addr,
            );
        }
    }

    /// The connections as a stream (for tonic), which never ends nor fails.
    pub fn into_stream(self) -> impl futures::Stream<Item = io::Result<Connection>> {
        futures::stream::unfold(self, |mut listener| async move {
            let (connection, _) = listener.next().await;
            Some((Ok(connection), listener))
        })
    }
}

/// No Nagle delay, the send buffer asked for. Failing either leaves the kernel's
/// defaults, which work, so it is only logged.
fn prepare(stream: &TcpStream, send_buffer: Option<usize>) {
    if let Err(e) = stream.set_nodelay(true) {
        warn!(cause = %e, "could not turn Nagle's algorithm off on a connection");
    }
    if let Some(bytes) = send_buffer {
        if let Err(e) = socket2::SockRef::from(stream).set_send_buffer_size(bytes) {
            warn!(cause = %e, "could not size a connection's send buffer");
        }
    }
}

impl Connection {
    /// Reads the first bytes without taking them (to tell TLS from plaintext).
    pub async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.peek(buf).await
    }
}

impl tonic::transport::server::Connected for Connection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn connections_past_the_most_are_told_and_closed_until_one_closes() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut bounded = Bounded::new(listener, 2)
            .with_send_buffer(8192)
            .with_refusal(b"busy".to_vec());
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let _c2 = TcpStream::connect(addr).await.unwrap();
        let (first, _) = bounded.next().await;
        let (_second, _) = bounded.next().await;
        // A third is refused while two are open: it reads the refusal, then the end.
        let mut c3 = TcpStream::connect(addr).await.unwrap();
        let taken = tokio::time::timeout(Duration::from_millis(300), bounded.next()).await;
        assert!(taken.is_err(), "a third was taken while two were open");
        let mut told = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c3.read_to_end(&mut told))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(told, b"busy");
        drop(first);
        let _c4 = TcpStream::connect(addr).await.unwrap();
        let (fourth, _) = tokio::time::timeout(Duration::from_secs(5), bounded.next())
            .await
            .unwrap();
        assert!(fourth.stream.nodelay().unwrap());
        // The kernel doubles what it is asked for.
        let sndbuf = socket2::SockRef::from(&fourth.stream)
            .send_buffer_size()
            .unwrap();
        assert!(sndbuf <= 4 * 8192, "{sndbuf}");
    }
}
