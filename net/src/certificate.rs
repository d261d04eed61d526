//! A node's certified key, renewable while it runs, and the TLS configurations built from
//! it: QUIC (the data plane), gRPC (the control plane) and the API port's TLS.
//!
//! Certificates have a lifetime, so a node renews its certificate while it is a member
//! (the coordinator signs a new one for the same key before half the lifetime is gone).
//! Every configuration here asks the identity for its certificate at each handshake
//! (rustls's certificate resolvers), so a renewal reaches every new connection at once,
//! without rebuilding endpoints or servers; connections already open carry on.

use std::sync::{Arc, RwLock};

use rcgen::{KeyPair, PublicKeyData};
use rustls::sign::{CertifiedKey, SigningKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Error, Result};
use crate::identity::{key_fingerprint_of_cert, sha256_hex};

/// QUIC connections a node lets be in their handshake at once.
const MAX_HANDSHAKING: usize = 256;

/// A certified key: what a node presents on every control and data connection. Clones
/// share the certificate, so renewing one renews them all.
#[derive(Clone)]
pub struct Identity {
    name: String,
    key_der: Vec<u8>,
    key_fingerprint: String,
    ca_der: CertificateDer<'static>,
    signing_key: Arc<dyn SigningKey>,
    current: Arc<RwLock<CertificateDer<'static>>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.name)
    }
}

pub(crate) fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Identity {
    pub(crate) fn new(
        name: &str,
        cert_der: CertificateDer<'static>,
        key: &KeyPair,
        ca_der: CertificateDer<'static>,
    ) -> Result<Self> {
        let key_der = key.serialize_der();
        let signing_key = crypto_provider()
            .key_provider
            .load_private_key(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key_der.clone(),
            )))?;
        Ok(Identity {
            name: name.to_string(),
            key_der,
            key_fingerprint: sha256_hex(&key.subject_public_key_info()),
            ca_der,
            signing_key,
            current: Arc::new(RwLock::new(cert_der)),
        })
    }

    /// SHA-256 (hex) of the public key: who this node is on the data plane.
    pub fn key_fingerprint(&self) -> &str {
        &self.key_fingerprint
    }

    /// The name the certificate is for.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This node's certificate now.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The cluster CA certificate.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The key pair (for the CA to certify it again).
    pub(crate) fn key_pair(&self) -> Result<KeyPair> {
        Ok(KeyPair::try_from(self.key_der.as_slice())?)
    }

    /// Presents `cert_der` from the next handshake on. It must certify this identity's
    /// key: anything else is refused and the old certificate stays.
    pub fn renew(&self, cert_der: Vec<u8>) -> Result<()> {
        match key_fingerprint_of_cert(&cert_der) {
            Some(k) if k == self.key_fingerprint => {}
            _ => {
                return Err(Error::Tls(format!(
                    "a renewed certificate for {} does not certify its key",
                    self.name
                )))
            }
        }
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = CertificateDer::from(cert_der);
        Ok(())
    }

    fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        Ok(roots)
    }

    /// What handshakes present: the current certificate (and the CA after it, for a
    /// peer that learns the CA from the chain).
    fn presented(&self, with_ca: bool) -> Arc<Presented> {
        Arc::new(Presented {
            current: self.current.clone(),
            key: self.signing_key.clone(),
            ca: with_ca.then(|| self.ca_der.clone()),
        })
    }

    fn client_verifier(&self) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            crypto_provider(),
        )
        .build()
        .map_err(|e| Error::Tls(e.to_string()))
    }

    /// TLS 1.3 server side with client certificates required, verified against the CA.
    fn mutual_server(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig> {
        let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_cert_resolver(self.presented(false));
        tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(tls)
    }

    /// TLS 1.3 client side presenting this identity, trusting only the CA.
    fn mutual_client(&self, alpn: &[u8]) -> Result<rustls::ClientConfig> {
        let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_cert_resolver(self.presented(false));
        tls.alpn_protocols = vec![alpn.to_vec()];
        Ok(tls)
    }

    /// QUIC server side: TLS 1.3, ALPN `strata/1`, client certificates required and
    /// verified against the cluster CA.
    pub fn quic_server_config(&self) -> Result<quinn::ServerConfig> {
        let tls = self.mutual_server(&[strata_proto::DATA_ALPN])?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| Error::Tls(e.to_string()))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(Arc::new(crate::transport::transport_config()));
        // Connections still in their handshake (quinn's default is 65,536): a cluster has
        // a few peers, so a flood of strangers' handshakes is held to this many.
        config.max_incoming(MAX_HANDSHAKING);
        Ok(config)
    }

    /// QUIC client side: presents this identity, trusts only the cluster CA.
    pub fn quic_client_config(&self) -> Result<quinn::ClientConfig> {
        let tls = self.mutual_client(strata_proto::DATA_ALPN)?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| Error::Tls(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(crate::transport::transport_config()));
        Ok(config)
    }

    /// A worker's control port: gRPC (HTTP/2) and slice loads
    /// ([`SLICE_ALPN`](strata_proto::SLICE_ALPN)), client certificates required.
    pub fn control_server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        Ok(Arc::new(
            self.mutual_server(&[b"h2", strata_proto::SLICE_ALPN])?,
        ))
    }

    /// A slice load's client side (the coordinator sending one to a worker), presenting
    /// this identity.
    pub fn slice_client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        Ok(Arc::new(self.mutual_client(strata_proto::SLICE_ALPN)?))
    }

    /// gRPC client side (the coordinator's calls to a worker): HTTP/2, presenting this
    /// identity.
    pub fn grpc_client_config(&self) -> Result<Arc<rustls::ClientConfig>> {
        Ok(Arc::new(self.mutual_client(b"h2")?))
    }

    /// The API port's server side: the coordinator's certificate and the CA after it (a
    /// joining worker learns the CA from the chain and checks it against its token),
    /// HTTP/2, no client certificate (the join proves the token instead).
    pub fn api_server_config(&self) -> Result<Arc<rustls::ServerConfig>> {
        let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(self.presented(true));
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(tls))
    }
}

/// The certificate a handshake presents, read anew each time.
#[derive(Debug)]
struct Presented {
    current: Arc<RwLock<CertificateDer<'static>>>,
    key: Arc<dyn SigningKey>,
    ca: Option<CertificateDer<'static>>,
}

impl Presented {
    fn certified(&self) -> Arc<CertifiedKey> {
        let mut chain = vec![self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()];
        chain.extend(self.ca.clone());
        Arc::new(CertifiedKey::new(chain, self.key.clone()))
    }
}

impl rustls::server::ResolvesServerCert for Presented {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }
}

impl rustls::client::ResolvesClientCert for Presented {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.certified())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{worker_name, ClusterCa};
    use crate::transport;
    use std::time::Duration;

    fn loopback(identity: &Identity) -> quinn::Endpoint {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        transport::endpoint(socket, identity).unwrap()
    }

    fn presented_by(conn: &quinn::Connection) -> CertificateDer<'static> {
        conn.peer_identity()
            .unwrap()
            .downcast::<Vec<CertificateDer<'static>>>()
            .unwrap()[0]
            .clone()
    }

    #[tokio::test]
    async fn an_expired_certificate_is_refused_and_a_renewed_one_reaches_new_connections() {
        let ca = ClusterCa::create().unwrap();
        // `a` gets a certificate that ends within the second; `b` one for an hour.
        let a = ca
            .issue_identity(&worker_name("a"), Duration::ZERO)
            .unwrap();
        let b = ca
            .issue_identity(&worker_name("b"), Duration::from_secs(3600))
            .unwrap();
        let (ea, eb) = (loopback(&a), loopback(&b));
        let (to_b, b_name) = (eb.local_addr().unwrap(), worker_name("b"));
        let accepting = {
            let eb = eb.clone();
            tokio::spawn(async move {
                while let Some(incoming) = eb.accept().await {
                    tokio::spawn(async move {
                        if let Ok(c) = incoming.await {
                            c.closed().await;
                        }
                    });
                }
            })
        };
        // Certificates' times are whole seconds: wait for `a`'s to be past its end.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let refused = transport::connect(&ea, to_b, &b_name).await;
        let refused = match refused {
            // (TLS 1.3 clients learn of a refused certificate on first use.)
            Ok(c) => c.closed().await.to_string(),
            Err(e) => e.to_string(),
        };
        assert!(
            refused.contains("expired") || refused.contains("certificate"),
            "{refused}"
        );

        // Renewed for the same key: the next handshake presents the new certificate,
        // through the endpoint built before the renewal.
        a.renew(ca.reissue(&a, Duration::from_secs(3600)).unwrap().to_vec())
            .unwrap();
        let renewed_b = ca.reissue(&b, Duration::from_secs(7200)).unwrap();
        b.renew(renewed_b.to_vec()).unwrap();
        let conn = transport::connect(&ea, to_b, &b_name).await.unwrap();
        assert_eq!(
            presented_by(&conn),
            renewed_b,
            "b presents its renewed certificate"
        );
        // It is still up a moment later: b took a's renewed certificate.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), conn.closed())
                .await
                .is_err(),
            "b refused a's renewed certificate"
        );
        // A certificate for another key is not a renewal.
        let e = a.renew(b.cert_der().to_vec()).unwrap_err();
        assert!(e.to_string().contains("does not certify its key"), "{e}");
        accepting.abort();
    }
}
