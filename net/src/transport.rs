//! The QUIC data plane (quinn, mutual TLS, ALPN `strata/1`): one unidirectional stream
//! per frame, so sequences never wait behind each other's bytes (no head-of-line
//! blocking), and an accept loop that hands validated frames to a bounded channel.
//! Shared by workers and the coordinator (which sends to stage 0 and hears the last).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn, Instrument};

use crate::error::{Error, Result};
use crate::frame::{self, Frame};
use crate::identity::Identity;

/// A peer that stays silent this long is gone: the failure-detection bound of the data plane.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Keep-alive interval, well inside the idle timeout.
pub const KEEP_ALIVE: Duration = Duration::from_millis(800);
/// Concurrent frames in flight on one connection.
const MAX_STREAMS: u32 = 1024;
/// How long handing one frame to QUIC may take before the peer counts as unreachable
/// (flow control stalls a send when the receiver stops reading).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialing a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Transport parameters of every Strata QUIC connection.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    #[allow(clippy::expect_used)] // a constant of a few seconds always fits
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_concurrent_uni_streams(MAX_STREAMS.into());
    t.max_concurrent_bidi_streams(0u32.into());
    // Activations of a long prefill are megabytes: let one stream carry them unthrottled.
    t.stream_receive_window((64u32 << 20).into());
    t.receive_window((256u32 << 20).into());
    t.send_window(256 << 20);
    t
}

/// A QUIC endpoint on an already-bound UDP socket, serving and dialing with `identity`.
pub fn endpoint(socket: std::net::UdpSocket, identity: &Identity) -> Result<quinn::Endpoint> {
    let mut ep = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(identity.quic_server_config()?),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?;
    ep.set_default_client_config(identity.quic_client_config()?);
    Ok(ep)
}

/// Dials `addr`, expecting its certificate to name `server_name`.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<quinn::Connection> {
    let peer = format!("{server_name} at {addr}");
    let connecting = ep
        .connect(addr, server_name)
        .map_err(|e| Error::Connection {
            peer: peer.clone(),
            reason: e.to_string(),
        })?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(Error::Connection {
            peer,
            reason: e.to_string(),
        }),
        Err(_) => Err(Error::Timeout {
            what: format!("connecting to {peer}"),
            seconds: CONNECT_TIMEOUT.as_secs_f64(),
        }),
    }
}

/// Sends one frame on its own stream, within [`SEND_TIMEOUT`].
pub async fn send_frame(conn: &quinn::Connection, frame: &Frame) -> Result<()> {
    let peer = conn.remote_address().to_string();
    match tokio::time::timeout(SEND_TIMEOUT, write_frame(conn, frame)).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: format!("sending a frame to {peer}"),
            seconds: SEND_TIMEOUT.as_secs_f64(),
        }),
    }
}

async fn write_frame(conn: &quinn::Connection, frame: &Frame) -> Result<()> {
    let fail = |reason: String| Error::Connection {
        peer: conn.remote_address().to_string(),
        reason,
    };
    let (header, payload) = frame.encode();
    let mut stream = conn.open_uni().await.map_err(|e| fail(e.to_string()))?;
    stream
        .write_all(&header)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if !payload.is_empty() {
        stream
            .write_all(payload)
            .await
            .map_err(|e| fail(e.to_string()))?;
    }
    stream.finish().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

/// Reads one frame from a stream, validating the header before reading the payload.
pub async fn read_frame(stream: &mut quinn::RecvStream, peer: &str) -> Result<Frame> {
    let bad = |reason: String| Error::BadFrame {
        peer: peer.to_string(),
        reason,
    };
    let mut prefix = [0u8; 4];
    stream
        .read_exact(&mut prefix)
        .await
        .map_err(|e| bad(format!("reading the length: {e}")))?;
    let len = frame::header_len(prefix).map_err(bad)?;
    let mut header_bytes = vec![0u8; len];
    stream
        .read_exact(&mut header_bytes)
        .await
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    let header = frame::decode_header(&header_bytes).map_err(bad)?;
    // Validated against MAX_FRAME_PAYLOAD_BYTES, so this allocation is bounded.
    let mut payload = vec![0u8; header.payload_bytes() as usize];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(|e| bad(format!("reading the payload: {e}")))?;
    Frame::from_wire(header, payload).map_err(bad)
}

/// Accepts connections on `ep` until cancelled, feeding each valid frame to `frames`.
/// A peer that fails the TLS handshake (no cluster certificate) is refused and logged.
pub fn spawn_acceptor(
    ep: quinn::Endpoint,
    frames: mpsc::Sender<Frame>,
    cancel: CancellationToken,
    role: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let incoming = tokio::select! {
                _ = cancel.cancelled() => break,
                i = ep.accept() => match i { Some(i) => i, None => break },
            };
            let frames = frames.clone();
            let cancel = cancel.clone();
            let remote = incoming.remote_address();
            let span = tracing::info_span!("connection", remote = %remote);
            tokio::spawn(
                async move {
                    let conn = match incoming.await {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(cause = %e, "{role}: refused a data-plane connection: it did not present a certificate of this cluster");
                            return;
                        }
                    };
                    debug!("data-plane connection up");
                    let peer = remote.to_string();
                    loop {
                        let mut stream = tokio::select! {
                            _ = cancel.cancelled() => break,
                            s = conn.accept_uni() => match s {
                                Ok(s) => s,
                                Err(e) => { debug!(cause = %e, "data-plane connection closed"); break; }
                            },
                        };
                        let frames = frames.clone();
                        let peer = peer.clone();
                        tokio::spawn(async move {
                            match read_frame(&mut stream, &peer).await {
                                Ok(f) => {
                                    let _ = frames.send(f).await;
                                }
                                Err(e) => warn!(cause = %e, "dropped a frame"),
                            }
                        });
                    }
                }
                .instrument(span),
            );
        }
    })
}
