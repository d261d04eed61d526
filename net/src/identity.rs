//! Cluster identity: the secret and the join token that carries it, the cluster CA that
//! the coordinator runs, the certificates it issues, and the rustls configurations of
//! mutual TLS for the control (gRPC) and data (QUIC) planes.
//!
//! The join protocol never sends the secret: a worker proves it with an HMAC over its
//! certificate signing request (useless to anyone without the request's private key),
//! and the coordinator proves it back with an HMAC over the certificate it issues. After
//! that, every connection is mutual TLS with the cluster CA as the only root.

use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};

pub(crate) use crate::certificate::crypto_provider;
pub use crate::certificate::Identity;
use crate::error::{Error, Result};

/// TLS server name of the coordinator's certificate.
pub const COORDINATOR_NAME: &str = "coordinator.strata";

/// Prefix of a join token; names the token format version.
const TOKEN_PREFIX: &str = "strata1";

/// The state directory's files: the CA's key and certificate, and the secret.
const CA_KEY_FILE: &str = "ca.key.pem";
const CA_CERT_FILE: &str = "ca.cert.der";
const SECRET_FILE: &str = "cluster.secret";

/// Bytes of the cluster secret.
const SECRET_BYTES: usize = 32;
/// How long a certificate the CA issues is valid unless told otherwise. A member renews
/// its certificate before half of it is gone; one that is not renewed (cut off, or
/// removed) stops being accepted by any new connection when it ends.
pub const CERT_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// How long before its issue a certificate is valid already: clocks of a LAN's machines
/// disagree by seconds, sometimes minutes.
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

type HmacSha256 = Hmac<Sha256>;

/// TLS server name of a worker's certificate.
pub fn worker_name(id: &str) -> String {
    format!("{id}.worker.strata")
}

/// Turns a host name into a worker id: lowercase letters, digits and `-`, at most 40.
pub fn sanitize_id(raw: &str) -> String {
    let mut id: String = raw
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    id.truncate(40);
    let id = id.trim_matches('-').to_string();
    if id.is_empty() {
        "worker".into()
    } else {
        id
    }
}

/// SHA-256 of some bytes, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A join token: which cluster, and the secret that proves membership.
#[derive(Clone)]
pub struct JoinToken {
    cluster_id: String,
    secret: [u8; SECRET_BYTES],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "JoinToken({})", self.cluster_id)
    }
}

impl JoinToken {
    /// Parses `strata1-<cluster id>-<secret>`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |why: &str| Error::BadToken(why.to_string());
        let mut parts = text.trim().split('-');
        if parts.next() != Some(TOKEN_PREFIX) {
            return Err(bad(
                "a join token starts with `strata1-`; print one with `strata token create`",
            ));
        }
        let cluster_id = parts
            .next()
            .ok_or_else(|| bad("the cluster id is missing"))?;
        let secret_hex = parts.next().ok_or_else(|| bad("the secret is missing"))?;
        if parts.next().is_some() || cluster_id.len() != 16 || hex::decode(cluster_id).is_err() {
            return Err(bad(
                "expected `strata1-` then 16 hex digits, `-`, and 64 hex digits",
            ));
        }
        let secret: [u8; SECRET_BYTES] = hex::decode(secret_hex)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| bad("the secret must be 64 hex digits"))?;
        Ok(JoinToken {
            cluster_id: cluster_id.to_string(),
            secret,
        })
    }

    /// The cluster this token joins.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The token's text.
    pub fn to_text(&self) -> String {
        format!(
            "{TOKEN_PREFIX}-{}-{}",
            self.cluster_id,
            hex::encode(self.secret)
        )
    }

    /// The operator credential this token grants (see [`crate::operator`]).
    pub fn operator_key(&self) -> crate::operator::OperatorKey {
        let key: [u8; SECRET_BYTES] = self
            .mac(b"strata-operator-v1", &[])
            .finalize()
            .into_bytes()
            .into();
        crate::operator::OperatorKey::new(self.cluster_id.clone(), key)
    }

    /// An HMAC under the secret over the whole token's cluster id, a label and `data`:
    /// a token with the right secret but another cluster's id proves nothing.
    fn mac(&self, label: &[u8], data: &[u8]) -> HmacSha256 {
        #[allow(clippy::expect_used)] // HMAC takes keys of any length
        let mut mac = HmacSha256::new_from_slice(&self.secret).expect("hmac accepts any key");
        mac.update(label);
        mac.update(&(self.cluster_id.len() as u32).to_be_bytes());
        mac.update(self.cluster_id.as_bytes());
        mac.update(data);
        mac
    }

    /// HMAC over length-prefixed `parts` under `label`.
    fn proof(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = self.mac(label, &[]);
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// A worker's proof of the token, bound to the coordinator's challenge and to its
    /// signing request (and so to the key the request is signed with).
    pub fn join_proof(&self, challenge: &[u8], csr_der: &[u8]) -> Vec<u8> {
        self.proof(b"strata-join-v3", &[challenge, csr_der])
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Checks a worker's proof (in constant time).
    pub fn verify_join(&self, challenge: &[u8], csr_der: &[u8], proof: &[u8]) -> bool {
        self.proof(b"strata-join-v3", &[challenge, csr_der])
            .verify_slice(proof)
            .is_ok()
    }

    /// The coordinator's proof of the token, bound to the challenge and to the
    /// certificate it issued.
    pub fn admit_proof(&self, challenge: &[u8], cert_der: &[u8]) -> Vec<u8> {
        self.proof(b"strata-admit-v3", &[challenge, cert_der])
            .finalize()
            .into_bytes()
            .to_vec()
    }

    /// Checks the coordinator's proof (in constant time).
    pub fn verify_admit(&self, challenge: &[u8], cert_der: &[u8], proof: &[u8]) -> bool {
        self.proof(b"strata-admit-v3", &[challenge, cert_der])
            .verify_slice(proof)
            .is_ok()
    }
}

/// The cluster's certificate authority and secret, kept by the coordinator.
pub struct ClusterCa {
    key: KeyPair,
    cert_der: CertificateDer<'static>,
    token: JoinToken,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterCa({})", self.token.cluster_id)
    }
}

/// The cluster id of a CA certificate: the first 8 bytes of its SHA-256, in hex.
pub fn cluster_id_of(ca_der: &[u8]) -> String {
    sha256_hex(ca_der)[..16].to_string()
}

impl ClusterCa {
    /// Loads the CA and secret from `dir`, or creates them there (files readable by the
    /// owner only). Returns whether they were created.
    pub fn load_or_create(dir: &Path) -> Result<(Self, bool)> {
        if let Some(ca) = Self::load(dir)? {
            return Ok((ca, false));
        }
        let ca = Self::create()?;
        create_private_dir(dir)?;
        write_private(&dir.join(CA_KEY_FILE), ca.key.serialize_pem().as_bytes())?;
        write_private(&dir.join(CA_CERT_FILE), &ca.cert_der)?;
        write_private(
            &dir.join(SECRET_FILE),
            hex::encode(ca.token.secret).as_bytes(),
        )?;
        Ok((ca, true))
    }

    /// Loads the CA and secret from `dir`; `None` when there is no cluster there. A
    /// partial or badly protected state is an error that names the fix.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let secret_path = dir.join(SECRET_FILE);
        let files = [&key_path, &cert_path, &secret_path];
        let (present, absent): (Vec<&PathBuf>, Vec<&PathBuf>) =
            files.iter().partition(|p| p.exists());
        if !present.is_empty() && !absent.is_empty() {
            let names = |ps: &[&PathBuf]| {
                ps.iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(Error::State(format!(
                "the cluster state in {} is partial: {} missing beside {}. A new CA would \
                 lock every worker out, so nothing was changed: restore the missing files from \
                 a backup, or move the directory away to start a new cluster (every worker \
                 then needs the new token)",
                dir.display(),
                names(&absent),
                names(&present)
            )));
        }
        if absent.is_empty() {
            check_private(dir, &files)?;
            let read = |p: &Path| std::fs::read(p).map_err(|e| Error::io(p, e));
            let key_pem = String::from_utf8(read(&key_path)?)
                .map_err(|_| Error::State(format!("{} is not PEM text", key_path.display())))?;
            let key = KeyPair::from_pem(&key_pem)?;
            let cert_der = CertificateDer::from(read(&cert_path)?);
            let secret: [u8; SECRET_BYTES] = hex::decode(read(&secret_path)?.trim_ascii())
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| {
                    Error::State(format!(
                        "{} does not hold a 64-hex-digit secret; delete the directory to start a new cluster",
                        secret_path.display()
                    ))
                })?;
            let token = JoinToken {
                cluster_id: cluster_id_of(&cert_der),
                secret,
            };
            return Ok(Some(ClusterCa {
                key,
                cert_der,
                token,
            }));
        }
        Ok(None)
    }

    /// A new CA and secret, in memory.
    pub fn create() -> Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Strata cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let cert_der = cert.der().clone();
        let mut secret = [0u8; SECRET_BYTES];
        getrandom::fill(&mut secret).map_err(|e| Error::State(format!("no randomness: {e}")))?;
        let token = JoinToken {
            cluster_id: cluster_id_of(&cert_der),
            secret,
        };
        Ok(ClusterCa {
            key,
            cert_der,
            token,
        })
    }

    /// The join token of this cluster.
    pub fn token(&self) -> &JoinToken {
        &self.token
    }

    /// The CA certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a certificate for `name` over the public key of a signing request. The
    /// request's own names and extensions are ignored: the CA decides what it certifies.
    pub fn sign_request(
        &self,
        csr_der: &[u8],
        name: &str,
        lifetime: std::time::Duration,
    ) -> Result<CertificateDer<'static>> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())?;
        self.issue_for(&csr.public_key, name, lifetime)
    }

    /// A new certificate for `identity`'s key and name, valid for `lifetime` from now
    /// (the coordinator renewing its own).
    pub fn reissue(
        &self,
        identity: &Identity,
        lifetime: std::time::Duration,
    ) -> Result<CertificateDer<'static>> {
        self.issue_for(&identity.key_pair()?, identity.name(), lifetime)
    }

    /// SHA-256 (hex) of the public key a signing request is for, once its signature
    /// shows the requester holds that key: what identifies a worker across its joins.
    pub fn request_key_fingerprint(csr_der: &[u8]) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())?;
        Ok(sha256_hex(&csr.public_key.subject_public_key_info()))
    }

    fn issue_for(
        &self,
        public_key: &impl PublicKeyData,
        name: &str,
        lifetime: std::time::Duration,
    ) -> Result<CertificateDer<'static>> {
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + lifetime;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = Issuer::from_ca_cert_der(&self.cert_der, &self.key)?;
        Ok(params.signed_by(public_key, &issuer)?.der().clone())
    }

    /// A fresh key and certificate for `name`, signed by this CA (the coordinator's own).
    pub fn issue_identity(&self, name: &str, lifetime: std::time::Duration) -> Result<Identity> {
        let key = KeyPair::generate()?;
        let cert_der = self.issue_for(&key, name, lifetime)?;
        Identity::new(name, cert_der, &key, self.cert_der.clone())
    }
}

/// Writes a file only its owner can read, atomically: a temporary file beside it (0600),
/// synced, renamed over it, and the directory synced, so a crash leaves the old file or
/// the new one, never half of one.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::io(&p, e)
    };
    // A temporary file left by a crash is replaced, not trusted.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&tmp, e)),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Creates the state directory (and any parents) only its owner can enter; an existing
/// one, still without state, is closed to others.
fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|e| Error::io(dir, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
            Error::State(format!(
                "cannot make {} private to this user ({e}): give it to this user with \
                 mode 0700, or choose another --state-dir",
                dir.display()
            ))
        })?;
    }
    Ok(())
}

/// Refuses state that other users can read or change: the directory must be 0700 and
/// the files 0600 (or stricter), each with the command that fixes it.
fn check_private(dir: &Path, files: &[&PathBuf]) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| {
            std::fs::metadata(p)
                .map(|m| m.permissions().mode() & 0o777)
                .map_err(|e| Error::io(p, e))
        };
        let m = mode(dir)?;
        if m & 0o077 != 0 {
            return Err(Error::State(format!(
                "the cluster state directory {} is open to other users (mode {m:03o}): \
                 `chmod 700 {}`",
                dir.display(),
                dir.display()
            )));
        }
        for f in files {
            let m = mode(f)?;
            if m & 0o077 != 0 {
                return Err(Error::State(format!(
                    "{} is open to other users (mode {m:03o}): `chmod 600 {}`; if anyone \
                     else could read it, start a new cluster, as its secret may be known",
                    f.display(),
                    f.display()
                )));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (dir, files);
    Ok(())
}

/// SHA-256 (hex) of the public key a certificate certifies (what [`PendingKey::fingerprint`]
/// and [`Identity::key_fingerprint`] say of its key); `None` when it does not parse.
pub fn key_fingerprint_of_cert(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    Some(sha256_hex(cert.tbs_certificate.subject_pki.raw))
}

/// A key that will be certified: kept by a worker from start until it has joined.
pub struct PendingKey {
    key: KeyPair,
}

impl PendingKey {
    /// A new key.
    pub fn generate() -> Result<Self> {
        Ok(PendingKey {
            key: KeyPair::generate()?,
        })
    }

    /// SHA-256 (hex) of the public key: advertised over mDNS, certified on join.
    pub fn fingerprint(&self) -> String {
        sha256_hex(&self.key.subject_public_key_info())
    }

    /// A signing request for this key (DER).
    pub fn signing_request(&self, name: &str) -> Result<Vec<u8>> {
        let params = CertificateParams::new(vec![name.to_string()])?;
        Ok(params.serialize_request(&self.key)?.der().to_vec())
    }

    /// The identity once the coordinator has certified this key.
    pub fn into_identity(
        &self,
        name: &str,
        cert_der: Vec<u8>,
        ca_der: Vec<u8>,
    ) -> Result<Identity> {
        Identity::new(
            name,
            CertificateDer::from(cert_der),
            &self.key,
            CertificateDer::from(ca_der),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_rejects_garbage() {
        let ca = ClusterCa::create().unwrap();
        let text = ca.token().to_text();
        let parsed = JoinToken::parse(&text).unwrap();
        assert_eq!(parsed.cluster_id(), ca.token().cluster_id());
        assert_eq!(parsed.to_text(), text);
        for bad in [
            "",
            "strata1-zz-00",
            "strata2-0011223344556677-00",
            &text[..text.len() - 2],
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn join_proof_needs_the_secret_the_same_challenge_and_the_same_request() {
        let ca = ClusterCa::create().unwrap();
        let other = ClusterCa::create().unwrap();
        let key = PendingKey::generate().unwrap();
        let csr = key.signing_request("w1").unwrap();
        let challenge = b"challenge one";
        let proof = ca.token().join_proof(challenge, &csr);
        assert!(ca.token().verify_join(challenge, &csr, &proof));
        assert!(!other.token().verify_join(challenge, &csr, &proof));
        // Another challenge: a captured proof does not answer it.
        assert!(!ca.token().verify_join(b"challenge two", &csr, &proof));
        let csr2 = PendingKey::generate()
            .unwrap()
            .signing_request("w1")
            .unwrap();
        assert!(!ca.token().verify_join(challenge, &csr2, &proof));
        // The right secret under another cluster's id proves nothing, either way.
        let text = ca.token().to_text();
        let secret = text.rsplit_once('-').unwrap().1;
        let elsewhere = JoinToken::parse(&format!(
            "{TOKEN_PREFIX}-{}-{secret}",
            other.token().cluster_id()
        ))
        .unwrap();
        assert!(!ca
            .token()
            .verify_join(challenge, &csr, &elsewhere.join_proof(challenge, &csr)));
        let cert = b"a certificate";
        let admit = ca.token().admit_proof(challenge, cert);
        assert!(ca.token().verify_admit(challenge, cert, &admit));
        assert!(!ca.token().verify_admit(b"challenge two", cert, &admit));
        assert!(!elsewhere.verify_admit(challenge, cert, &admit));
    }

    #[test]
    fn issued_certificate_names_the_worker_and_chains_to_the_ca() {
        let ca = ClusterCa::create().unwrap();
        let key = PendingKey::generate().unwrap();
        let csr = key.signing_request("evil.example").unwrap();
        let cert = ca
            .sign_request(&csr, &worker_name("w1"), CERT_LIFETIME)
            .unwrap();
        let identity = key
            .into_identity("w1", cert.to_vec(), ca.cert_der().to_vec())
            .unwrap();
        // Both TLS configurations build from it (they parse key and chain).
        identity.quic_server_config().unwrap();
        identity.quic_client_config().unwrap();
        let text = String::from_utf8_lossy(&cert);
        assert!(text.contains("w1.worker.strata"));
        assert!(!text.contains("evil.example"));
    }

    #[test]
    fn state_dir_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = ClusterCa::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (b, created) = ClusterCa::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.token().to_text(), b.token().to_text());
    }

    #[cfg(unix)]
    #[test]
    fn state_is_private_checked_on_every_start_and_never_silently_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("state");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let (ca, _) = ClusterCa::load_or_create(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let files = ["ca.key.pem", "ca.cert.der", "cluster.secret"];
        for f in files {
            assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
        }
        // Opened up: refused, naming the fix; closed again: loads.
        chmod(&dir, 0o755);
        let e = ClusterCa::load_or_create(&dir).err().unwrap().to_string();
        assert!(e.contains("chmod 700") && e.contains("755"), "{e}");
        chmod(&dir, 0o700);
        chmod(&dir.join("cluster.secret"), 0o644);
        let e = ClusterCa::load_or_create(&dir).err().unwrap().to_string();
        assert!(
            e.contains("chmod 600") && e.contains("cluster.secret"),
            "{e}"
        );
        chmod(&dir.join("cluster.secret"), 0o600);
        let (again, created) = ClusterCa::load_or_create(&dir).unwrap();
        assert!(!created);
        assert_eq!(again.token().to_text(), ca.token().to_text());
        // A file missing: refused, and the rest left as it was (no new CA).
        let key = std::fs::read(dir.join("ca.key.pem")).unwrap();
        std::fs::remove_file(dir.join("ca.cert.der")).unwrap();
        let e = ClusterCa::load_or_create(&dir).err().unwrap().to_string();
        assert!(e.contains("partial") && e.contains("ca.cert.der"), "{e}");
        assert_eq!(std::fs::read(dir.join("ca.key.pem")).unwrap(), key);
        assert!(!dir.join("ca.cert.der").exists());
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn a_certificates_key_fingerprint_is_its_holders() {
        let ca = ClusterCa::create().unwrap();
        let key = PendingKey::generate().unwrap();
        let csr = key.signing_request("w1").unwrap();
        let cert = ca
            .sign_request(&csr, &worker_name("w1"), CERT_LIFETIME)
            .unwrap();
        let fingerprint = key_fingerprint_of_cert(&cert).unwrap();
        assert_eq!(fingerprint, key.fingerprint());
        assert_eq!(
            ClusterCa::request_key_fingerprint(&csr).unwrap(),
            fingerprint
        );
        let identity = key
            .into_identity(&worker_name("w1"), cert.to_vec(), ca.cert_der().to_vec())
            .unwrap();
        assert_eq!(identity.key_fingerprint(), fingerprint);
        let coordinator = ca.issue_identity(COORDINATOR_NAME, CERT_LIFETIME).unwrap();
        assert_eq!(
            key_fingerprint_of_cert(&coordinator.cert_der()).unwrap(),
            coordinator.key_fingerprint()
        );
        assert_ne!(coordinator.key_fingerprint(), fingerprint);
        assert!(key_fingerprint_of_cert(b"not a certificate").is_none());
    }
}
