//! TLS on the coordinator's public gRPC port, for joins.
//!
//! The port serves clients in plaintext (grpcurl, the CLI, SDKs), and it also speaks TLS:
//! each connection is sorted by its first byte (a TLS handshake record starts with 0x16,
//! an HTTP/2 preface with `P`). A worker joins over TLS, and before it says anything it
//! checks that the coordinator's certificate chains to the CA that its token's cluster id
//! names (the first 8 bytes of the CA's SHA-256), so a stranger's record or a machine in
//! the middle gets nothing from it. The coordinator still proves the secret in its answer,
//! so the pin is not all that stands between a worker and an impostor.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::debug;

use crate::error::Result;
use crate::identity::{cluster_id_of, crypto_provider, Identity};
use crate::listen::{Bounded, Connection};

/// How long a new connection may take to send its first byte and finish a handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Sorted connections waiting for the server to take them.
const SORTED_QUEUE: usize = 64;
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A connection to the API port, in plaintext or TLS.
pub enum ApiConnection {
    /// A client that spoke plainly.
    Plain(Connection),
    /// A client that opened with a TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<Connection>>),
}

/// Where a call came from and whether it came over TLS (in each request's extensions).
#[derive(Debug, Clone, Copy)]
pub struct ApiConnectInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// The address it reached.
    pub local: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
}

impl ApiConnection {
    fn inner(&self) -> &Connection {
        match self {
            ApiConnection::Plain(c) => c,
            ApiConnection::Tls(t) => t.get_ref().0,
        }
    }
}

impl tonic::transport::server::Connected for ApiConnection {
    type ConnectInfo = ApiConnectInfo;

    fn connect_info(&self) -> ApiConnectInfo {
        let tcp = self.inner().connect_info();
        ApiConnectInfo {
            remote: tcp.remote_addr(),
            local: tcp.local_addr(),
            tls: matches!(self, ApiConnection::Tls(_)),
        }
    }
}

/// `listener`'s connections, each sorted into plaintext or TLS (handshaken with `tls`).
pub fn sorted(
    listener: Bounded,
    tls: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = io::Result<ApiConnection>> {
    handshaken(listener, tls, sort)
}

/// `listener`'s connections after a TLS handshake with `tls` (a worker's control
/// service: mutual TLS). tonic reads the client's certificate from each.
pub fn tls_only(
    listener: Bounded,
    tls: Arc<rustls::ServerConfig>,
) -> impl futures::Stream<Item = io::Result<tokio_rustls::server::TlsStream<Connection>>> {
    handshaken(listener, tls, |connection, acceptor| {
        acceptor.accept(connection)
    })
}

/// `listener`'s connections once `handshake` is done with each, off the accept loop so
/// that one that sends nothing holds up no other. A connection that does not finish
/// within [`HANDSHAKE_TIMEOUT`] is closed.
fn handshaken<T, F, H>(
    mut listener: Bounded,
    tls: Arc<rustls::ServerConfig>,
    handshake: H,
) -> impl futures::Stream<Item = io::Result<T>>
where
    T: Send + 'static,
    F: Future<Output = io::Result<T>> + Send + 'static,
    H: Fn(Connection, TlsAcceptor) -> F + Clone + Send + 'static,
{
    let (tx, rx) = mpsc::channel(SORTED_QUEUE);
    tokio::spawn(async move {
        loop {
            let (connection, peer) = tokio::select! {
                _ = tx.closed() => return,
                next = listener.next() => next,
            };
            let (tx, acceptor) = (tx.clone(), TlsAcceptor::from(tls.clone()));
            let handshake = handshake.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(connection, acceptor)).await
                {
                    Ok(Ok(c)) => {
                        let _ = tx.send(Ok(c)).await;
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, cause = %e, "closed a connection: its handshake failed")
                    }
                    Err(_) => debug!(%peer, "closed a connection that stayed silent"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
}

async fn sort(connection: Connection, acceptor: TlsAcceptor) -> io::Result<ApiConnection> {
    let mut first = [0u8; 1];
    connection.peek(&mut first).await?;
    if first[0] == TLS_HANDSHAKE {
        Ok(ApiConnection::Tls(Box::new(
            acceptor.accept(connection).await?,
        )))
    } else {
        Ok(ApiConnection::Plain(connection))
    }
}

impl AsyncRead for ApiConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiConnection::Plain(c) => Pin::new(c).poll_read(cx, buf),
            ApiConnection::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ApiConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ApiConnection::Plain(c) => Pin::new(c).poll_write(cx, buf),
            ApiConnection::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiConnection::Plain(c) => Pin::new(c).poll_flush(cx),
            ApiConnection::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ApiConnection::Plain(c) => Pin::new(c).poll_shutdown(cx),
            ApiConnection::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts a coordinator's certificate only when it chains to a CA the chain carries
/// whose fingerprint is the token's cluster id.
#[derive(Debug)]
struct PinnedCluster {
    cluster_id: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCluster {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| cluster_id_of(c) == self.cluster_id)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "its certificate does not come with the CA of cluster {} that the token names",
                    self.cluster_id
                ))
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects over TLS for `tonic`'s `Endpoint::connect_with_connector`: to a
/// coordinator's API port trusting only the CA its token names ([`ClusterConnector::pinned`]),
/// or to a worker's control service with mutual TLS ([`ClusterConnector::mutual`]).
#[derive(Clone)]
pub struct ClusterConnector {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl ClusterConnector {
    /// To the coordinator, pinned to the CA of `cluster_id` (a worker joining).
    pub fn pinned(cluster_id: &str) -> Result<Self> {
        let provider = crypto_provider();
        let verifier = PinnedCluster {
            cluster_id: cluster_id.to_string(),
            provider: provider.clone(),
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ClusterConnector {
            config: Arc::new(tls),
            server_name: server_name(crate::identity::COORDINATOR_NAME)?,
        })
    }

    /// To a peer whose certificate is for `name`, presenting `identity` (the
    /// coordinator calling a worker). Renewals of `identity` reach new connections.
    pub fn mutual(identity: &Identity, name: &str) -> Result<Self> {
        Ok(ClusterConnector {
            config: identity.grpc_client_config()?,
            server_name: server_name(name)?,
        })
    }
}

fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string())
        .map_err(|e| crate::Error::Tls(format!("{name} is not a server name: {e}")))
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TlsClientStream>> + Send>>;
/// What [`ClusterConnector`] connects.
pub type TlsClientStream = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for ClusterConnector {
    type Response = TlsClientStream;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Connecting {
        let connector = TlsConnector::from(self.config.clone());
        let name = self.server_name.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(7433);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// When `error` (or what caused it) is a TLS failure, what it says: a coordinator whose
/// certificate is not of the token's cluster fails the handshake, and that is a refusal,
/// not a network error to retry.
pub fn tls_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(tls) = e
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        cause = e.source();
    }
    None
}
