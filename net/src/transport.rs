//! The QUIC data plane (quinn, mutual TLS, ALPN `strata/1`): one unidirectional stream
//! per frame, so sequences never wait behind each other's bytes (no head-of-line
//! blocking), and an accept loop that hands validated frames to a bounded channel.
//! Shared by workers and the coordinator (which sends to stage 0 and hears the last).
//!
//! A link is measured over the same endpoints ([`probe`]): a bidirectional stream is a
//! probe, whose bytes the receiver counts and answers, so pings and a short burst time
//! the very path activations take (QUIC, TLS, congestion control and all).

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
/// Probes one peer answers at once (a probe is a bidirectional stream).
const MAX_PROBES: u32 = 4;
/// The most bytes one probe may carry: what a receiver reads before answering.
pub const MAX_PROBE_BYTES: usize = 16 << 20;
/// How long one probe (a ping or the burst) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Transport parameters of every Strata QUIC connection.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    #[allow(clippy::expect_used)] // a constant of a few seconds always fits
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_concurrent_uni_streams(MAX_STREAMS.into());
    t.max_concurrent_bidi_streams(MAX_PROBES.into());
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

/// The QUIC error code a receiver stops a refused frame's stream with.
const REFUSED: u32 = 1;

/// A frame that was not taken: why, and the failures to hand on in its place.
struct Refused {
    error: Error,
    failures: Option<Frame>,
}

/// Reads one frame from a stream, validating the header before reading the payload. A
/// frame refused after its header decoded names its sequences, which fail.
async fn read_frame(
    stream: &mut quinn::RecvStream,
    peer: &str,
) -> std::result::Result<Frame, Refused> {
    let mut header_bytes = Vec::new();
    match read_frame_parts(stream, peer, &mut header_bytes).await {
        Ok(frame) => Ok(frame),
        Err(error) => {
            let failures = frame::refusal(&header_bytes, &error.to_string());
            Err(Refused { error, failures })
        }
    }
}

async fn read_frame_parts(
    stream: &mut quinn::RecvStream,
    peer: &str,
    header_bytes: &mut Vec<u8>,
) -> Result<Frame> {
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
    header_bytes.resize(len, 0);
    stream
        .read_exact(header_bytes)
        .await
        .map_err(|e| bad(format!("reading the header: {e}")))?;
    let header = frame::decode_header(header_bytes).map_err(bad)?;
    // Validated against MAX_FRAME_PAYLOAD_BYTES, so this allocation is bounded.
    let mut payload = vec![0u8; header.payload_bytes() as usize];
    stream
        .read_exact(&mut payload)
        .await
        .map_err(|e| bad(format!("reading the payload: {e}")))?;
    Frame::from_wire(header, payload).map_err(bad)
}

/// Decides whether a frame from a peer (the SHA-256 of its certificate's public key) is
/// taken: `Err` says why not. A cluster certificate proves only membership; which member
/// may send what (the planned predecessor, in its epoch) is the receiver's to say.
pub type Gate = Arc<dyn Fn(&str, &Frame) -> std::result::Result<(), String> + Send + Sync>;

/// A gate that takes every frame of a cluster peer (tests of the transport alone).
pub fn open_gate() -> Gate {
    Arc::new(|_, _| Ok(()))
}

/// The key fingerprint of the certificate a connection's peer presented.
fn peer_key(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?;
    crate::identity::key_fingerprint_of_cert(certs.first()?)
}

/// Accepts connections on `ep` until cancelled, feeding each valid frame that `gate`
/// takes to `frames`. A peer that fails the TLS handshake (no cluster certificate) is
/// refused and logged; so is a frame the gate refuses, and its connection is closed.
pub fn spawn_acceptor(
    ep: quinn::Endpoint,
    frames: mpsc::Sender<Frame>,
    cancel: CancellationToken,
    role: &'static str,
    gate: Gate,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let incoming = tokio::select! {
                _ = cancel.cancelled() => break,
                i = ep.accept() => match i { Some(i) => i, None => break },
            };
            let frames = frames.clone();
            let cancel = cancel.clone();
            let gate = gate.clone();
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
                    let Some(key) = peer_key(&conn) else {
                        warn!("{role}: refused a data-plane connection: its certificate does not parse");
                        conn.close(REFUSED.into(), b"no certificate");
                        return;
                    };
                    debug!(key = %&key[..16], "data-plane connection up");
                    let peer = remote.to_string();
                    loop {
                        let stream = tokio::select! {
                            _ = cancel.cancelled() => break,
                            s = conn.accept_uni() => match s {
                                Ok(s) => s,
                                Err(e) => { debug!(cause = %e, "data-plane connection closed"); break; }
                            },
                            p = conn.accept_bi() => match p {
                                Ok((send, recv)) => {
                                    tokio::spawn(answer_probe(send, recv));
                                    continue;
                                }
                                Err(e) => { debug!(cause = %e, "data-plane connection closed"); break; }
                            },
                        };
                        let sender = Sender {
                            frames: frames.clone(),
                            gate: gate.clone(),
                            key: key.clone(),
                            conn: conn.clone(),
                            peer: peer.clone(),
                            role,
                        };
                        tokio::spawn(sender.take(stream));
                    }
                }
                .instrument(span),
            );
        }
    })
}

/// One peer's connection, as its frames are taken: who sent them and where they go.
struct Sender {
    frames: mpsc::Sender<Frame>,
    gate: Gate,
    key: String,
    conn: quinn::Connection,
    peer: String,
    role: &'static str,
}

impl Sender {
    /// Reads one frame off `stream` and hands it on if the gate takes it. A refused
    /// sender is cut off; a malformed frame fails the sequences it names, if the sender
    /// may speak of them.
    async fn take(self, mut stream: quinn::RecvStream) {
        let role = self.role;
        match read_frame(&mut stream, &self.peer).await {
            Ok(f) => match (self.gate)(&self.key, &f) {
                Ok(()) => {
                    let _ = self.frames.send(f).await;
                }
                Err(why) => {
                    let _ = stream.stop(REFUSED.into());
                    warn!(sender = %&self.key[..16], epoch = f.epoch(), "{role}: refused a frame: {why}");
                    self.conn.close(REFUSED.into(), b"not a planned sender");
                }
            },
            Err(Refused { error, failures }) => {
                // The sender's writes fail at once, and the answers in the frame hear why
                // from the failures handed on.
                let _ = stream.stop(REFUSED.into());
                let told = failures.as_ref().map_or(0, |f| match f {
                    Frame::Forward { failures, .. } | Frame::Tokens { failures, .. } => {
                        failures.len()
                    }
                    Frame::Free { .. } => 0,
                });
                warn!(cause = %error, sequences_failed = told, "refused a frame");
                // What it says of its sequences counts only from a sender that may speak
                // of them.
                if let Some(f) = failures.filter(|f| (self.gate)(&self.key, f).is_ok()) {
                    let _ = self.frames.send(f).await;
                }
            }
        }
    }
}

/// What a probe of one link measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkSample {
    /// The shortest round trip of the pings, milliseconds.
    pub rtt_ms: f64,
    /// Bytes per second of the burst (its time less one round trip).
    pub bandwidth: f64,
}

/// Measures the link of `conn`: `pings` small probes (the shortest round trip counts), then
/// a burst of a 16th of `burst_bytes` (at least 64 KiB) and one sized to take about half a
/// second at the rate the first showed (at most `burst_bytes`, itself at most
/// [`MAX_PROBE_BYTES`]); the faster rate counts. A slow link is measured without a burst
/// that would outlast the probe's deadline.
pub async fn probe(conn: &quinn::Connection, pings: u32, burst_bytes: usize) -> Result<LinkSample> {
    let mut rtt = Duration::MAX;
    for _ in 0..pings.max(1) {
        rtt = rtt.min(probe_once(conn, 8).await?);
    }
    let most = burst_bytes.clamp(64 << 10, MAX_PROBE_BYTES);
    // The burst's last byte needs a one-way trip and the answer another: what remains is
    // the time the bytes took on the wire (at least a microsecond, for a very fast link).
    let rate = |bytes: usize, took: Duration| {
        bytes as f64
            / took
                .saturating_sub(rtt)
                .max(Duration::from_micros(1))
                .as_secs_f64()
    };
    let first = (most / 16).max(64 << 10);
    let first_rate = rate(first, probe_once(conn, first).await?);
    let second = ((first_rate * 0.5) as usize).clamp(first, most);
    let second_rate = rate(second, probe_once(conn, second).await?);
    Ok(LinkSample {
        rtt_ms: rtt.as_secs_f64() * 1e3,
        bandwidth: first_rate.max(second_rate),
    })
}

/// One probe: `bytes` out, the peer's count back; the time it took.
async fn probe_once(conn: &quinn::Connection, bytes: usize) -> Result<Duration> {
    let peer = conn.remote_address().to_string();
    let fail = |reason: String| Error::Connection {
        peer: peer.clone(),
        reason,
    };
    let work = async {
        let started = std::time::Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
        let payload = vec![0x5a; bytes];
        send.write_all(&payload)
            .await
            .map_err(|e| fail(e.to_string()))?;
        send.finish().map_err(|e| fail(e.to_string()))?;
        let mut answer = [0u8; 8];
        recv.read_exact(&mut answer)
            .await
            .map_err(|e| fail(format!("reading the probe's answer: {e}")))?;
        let counted = u64::from_le_bytes(answer);
        if counted != bytes as u64 {
            return Err(fail(format!(
                "the peer counted {counted} bytes of a {bytes}-byte probe"
            )));
        }
        Ok(started.elapsed())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: format!("probing the link to {peer}"),
            seconds: PROBE_TIMEOUT.as_secs_f64(),
        }),
    }
}

/// Answers a probe: reads its bytes (at most [`MAX_PROBE_BYTES`]) and sends their count.
async fn answer_probe(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let work = async {
        let mut counted = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => {
                    counted += n as u64;
                    if counted > MAX_PROBE_BYTES as u64 {
                        return Err(format!("a probe over {MAX_PROBE_BYTES} bytes"));
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(e.to_string()),
            }
        }
        send.write_all(&counted.to_le_bytes())
            .await
            .map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())
    };
    match tokio::time::timeout(PROBE_TIMEOUT, work).await {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => debug!(%reason, "a link probe failed"),
        Err(_) => debug!("a link probe timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{worker_name, ClusterCa, CERT_LIFETIME};

    fn loopback_endpoint(identity: &Identity) -> quinn::Endpoint {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        endpoint(socket, identity).unwrap()
    }

    #[tokio::test]
    async fn a_probe_times_the_link_and_frames_still_flow_beside_it() {
        let ca = ClusterCa::create().unwrap();
        let a = ca.issue_identity(&worker_name("a"), CERT_LIFETIME).unwrap();
        let b = ca.issue_identity(&worker_name("b"), CERT_LIFETIME).unwrap();
        let (ea, eb) = (loopback_endpoint(&a), loopback_endpoint(&b));
        let (tx, mut rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        spawn_acceptor(eb.clone(), tx, cancel.clone(), "test", open_gate());
        let conn = connect(&ea, eb.local_addr().unwrap(), &worker_name("b"))
            .await
            .unwrap();

        let sample = probe(&conn, 3, 1 << 20).await.unwrap();
        assert!(sample.rtt_ms > 0.0 && sample.rtt_ms < 1000.0, "{sample:?}");
        // Loopback moves a MiB far faster than any LAN: at least 10 MB/s even in a
        // debug build on a busy machine.
        assert!(sample.bandwidth > 10e6, "{sample:?}");

        // The probe streams did not disturb the frame streams.
        let frame = Frame::Free {
            epoch: 7,
            seqs: vec![1],
        };
        send_frame(&conn, &frame).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.epoch(), 7);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_probe_over_the_limit_is_refused() {
        let ca = ClusterCa::create().unwrap();
        let a = ca.issue_identity(&worker_name("a"), CERT_LIFETIME).unwrap();
        let b = ca.issue_identity(&worker_name("b"), CERT_LIFETIME).unwrap();
        let (ea, eb) = (loopback_endpoint(&a), loopback_endpoint(&b));
        let (tx, _rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        spawn_acceptor(eb.clone(), tx, cancel.clone(), "test", open_gate());
        let conn = connect(&ea, eb.local_addr().unwrap(), &worker_name("b"))
            .await
            .unwrap();
        let err = probe_once(&conn, MAX_PROBE_BYTES + 1).await.unwrap_err();
        assert!(
            matches!(err, Error::Connection { .. } | Error::Timeout { .. }),
            "{err}"
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_cluster_member_the_gate_does_not_name_is_refused_and_cut_off() {
        let ca = ClusterCa::create().unwrap();
        let a = ca.issue_identity(&worker_name("a"), CERT_LIFETIME).unwrap();
        let b = ca.issue_identity(&worker_name("b"), CERT_LIFETIME).unwrap();
        let stranger = ca.issue_identity(&worker_name("c"), CERT_LIFETIME).unwrap();
        let (ea, eb, ec) = (
            loopback_endpoint(&a),
            loopback_endpoint(&b),
            loopback_endpoint(&stranger),
        );
        let (tx, mut rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let only_a = a.key_fingerprint().to_string();
        let gate: Gate = Arc::new(move |from, _| {
            (from == only_a)
                .then_some(())
                .ok_or_else(|| "not the planned predecessor".to_string())
        });
        spawn_acceptor(eb.clone(), tx, cancel.clone(), "test", gate);
        let to_b = eb.local_addr().unwrap();
        let frame = |epoch| Frame::Free {
            epoch,
            seqs: vec![1],
        };
        let from_c = connect(&ec, to_b, &worker_name("b")).await.unwrap();
        send_frame(&from_c, &frame(1)).await.unwrap();
        // The stranger's connection is closed and nothing reached the receiver.
        tokio::time::timeout(Duration::from_secs(5), from_c.closed())
            .await
            .unwrap();
        let from_a = connect(&ea, to_b, &worker_name("b")).await.unwrap();
        send_frame(&from_a, &frame(2)).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.epoch(), 2, "the stranger's frame got through");
        cancel.cancel();
    }
}
