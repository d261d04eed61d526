//! Client connections of the HTTP and gRPC APIs. At most [`MAX_CONNECTIONS`] are open at
//! once on each API (one more waits in the kernel's backlog until one closes), so what
//! clients open cannot exhaust the coordinator's file descriptors or memory. Each is set
//! up for token streams: no Nagle delay on small writes, and a small kernel send buffer,
//! so a client that stops reading a stream is noticed after tens of kilobytes rather than
//! the megabytes the kernel would otherwise buffer for it (its answer then waits one token
//! ahead of it, and gives its cache up while others wait: see `session`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// Most connections one API holds open at once.
pub const MAX_CONNECTIONS: usize = 512;
/// Each connection's kernel send buffer (the kernel doubles it for its bookkeeping): a
/// second or more of a fast token stream (an event is about 200 bytes), and a long
/// answer's JSON in a few round trips of a LAN.
const SEND_BUFFER: usize = 16 * 1024;

/// A listener that holds at most [`MAX_CONNECTIONS`] connections open.
pub struct Bounded {
    listener: TcpListener,
    permits: Arc<Semaphore>,
}

/// An accepted connection; closing it lets another in.
pub struct Connection {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Bounded {
    /// Bounds `listener`.
    pub fn new(listener: TcpListener) -> Self {
        Bounded {
            listener,
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// The next connection, once fewer than the most are open. Accept errors (out of file
    /// descriptors, a connection reset before it was taken) are logged and retried.
    pub async fn next(&mut self) -> (Connection, SocketAddr) {
        let permit = match self.permits.clone().acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    prepare(&stream);
                    return (
                        Connection {
                            stream,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                Err(e) => {
                    warn!(cause = %e, "could not accept a client connection; retrying");
                    // Out of descriptors frees up only as connections close: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
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

/// No Nagle delay, a small send buffer. Failing either leaves the kernel's defaults,
/// which work, so it is only logged.
fn prepare(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        warn!(cause = %e, "could not turn Nagle's algorithm off on a client connection");
    }
    if let Err(e) = socket2::SockRef::from(stream).set_send_buffer_size(SEND_BUFFER) {
        warn!(cause = %e, "could not size a client connection's send buffer");
    }
}

impl axum::serve::Listener for Bounded {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        self.next().await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
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
    async fn connections_past_the_most_wait_until_one_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut bounded = Bounded::new(listener);
        bounded.permits = Arc::new(Semaphore::new(2));
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
        }
        let (first, _) = bounded.next().await;
        let (_second, _) = bounded.next().await;
        let third = tokio::time::timeout(Duration::from_millis(200), bounded.next()).await;
        assert!(third.is_err(), "a third was taken while two were open");
        drop(first);
        let (third, _) = tokio::time::timeout(Duration::from_secs(5), bounded.next())
            .await
            .unwrap();
        assert!(third.stream.nodelay().unwrap());
        // The kernel doubles what it is asked for.
        let sndbuf = socket2::SockRef::from(&third.stream)
            .send_buffer_size()
            .unwrap();
        assert!(sndbuf <= 4 * SEND_BUFFER, "{sndbuf}");
    }
}
