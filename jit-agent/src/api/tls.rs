//! mTLS for the gRPC listener: client certificates must chain to a configured CA, be within
//! their validity, and carry exactly one SPIFFE ID in a trust domain that CA may issue for
//! (`tls.trust_domains` for the `tls.ca` bundle, `[[tls.authorities]]` for more CAs); anything
//! else is refused at the handshake. A CA pinned to its trust domains cannot mint an identity of
//! another (a corporate CA cannot issue `spiffe://prod/...`), and federation stays possible.
//! Certificate, key and bundle are re-read when their files change, so rotation needs no
//! restart; a set of files that does not load is refused and the previous one stays in force.
//! A connection made before a reload is held to the reloaded trust: the API re-verifies its
//! client chain on every call and ends its streams once the chain no longer verifies (a CA
//! removed from the files, or no longer allowed the identity's trust domain).

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use rustls::{
    DigitallySignedStruct, DistinguishedName, Error as TlsError, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::identity::spiffe_id_from_der;

/// TLS material that failed to load.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TlsLoadError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

fn load_err(path: &Path, message: impl std::fmt::Display) -> TlsLoadError {
    TlsLoadError {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Reads PEM certificates from `path`.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsLoadError> {
    let data = std::fs::read(path).map_err(|e| load_err(path, e))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| load_err(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(load_err(path, "holds no certificate"));
    }
    Ok(certs)
}

/// Reads a PEM private key from `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsLoadError> {
    let data = std::fs::read(path).map_err(|e| load_err(path, e))?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| load_err(path, format!("bad PEM: {e}")))?
        .ok_or_else(|| load_err(path, "holds no private key"))
}

/// One CA's WebPKI verifier and the trust domains it may issue for (empty: any).
#[derive(Debug)]
struct Authority {
    verifier: Arc<dyn ClientCertVerifier>,
    trust_domains: Vec<String>,
}

/// The WebPKI verifiers of the configured CAs, with the SPIFFE ID and trust-domain requirements.
#[derive(Debug)]
struct SpiffeClientVerifier {
    authorities: Vec<Authority>,
    hints: Vec<DistinguishedName>,
}

/// The trust domain of a SPIFFE ID (`spiffe://<domain>/...`).
fn trust_domain(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let id = spiffe_id_from_der(end_entity).map_err(TlsError::General)?;
        let domain = trust_domain(&id);
        let mut first_error = None;
        let mut chained_elsewhere = false;
        for a in &self.authorities {
            match a
                .verifier
                .verify_client_cert(end_entity, intermediates, now)
            {
                Ok(ok)
                    if a.trust_domains.is_empty()
                        || a.trust_domains.iter().any(|d| d == domain) =>
                {
                    return Ok(ok);
                }
                Ok(_) => chained_elsewhere = true,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if chained_elsewhere {
            return Err(TlsError::General(format!(
                "{id}: the CA that issued it may not issue identities of trust domain {domain:?}"
            )));
        }
        Err(first_error.unwrap_or_else(|| TlsError::General("no CA configured".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.first()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.first()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.first()
            .map(|v| v.supported_verify_schemes())
            .unwrap_or_default()
    }
}

impl SpiffeClientVerifier {
    /// Signature checks do not depend on the CA: any verifier (one provider) does them.
    fn first(&self) -> Result<&Arc<dyn ClientCertVerifier>, TlsError> {
        self.authorities
            .first()
            .map(|a| &a.verifier)
            .ok_or_else(|| TlsError::General("no CA configured".into()))
    }
}

/// The files TLS is built from.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The agent's certificate chain.
    pub cert: PathBuf,
    /// The agent's key.
    pub key: PathBuf,
    /// The CAs client certificates may chain to, each with its trust domains (empty: any).
    pub authorities: Vec<(PathBuf, Vec<String>)>,
}

impl TlsFiles {
    /// Every file, for the watcher.
    #[must_use]
    pub fn all(&self) -> Vec<PathBuf> {
        let mut out = vec![self.cert.clone(), self.key.clone()];
        out.extend(self.authorities.iter().map(|(ca, _)| ca.clone()));
        out
    }
}

/// Builds the server configuration from the files.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsLoadError> {
    load(files).map(|(cfg, _)| cfg)
}

/// The server configuration and its client verifier.
fn load(files: &TlsFiles) -> Result<(ServerConfig, Arc<SpiffeClientVerifier>), TlsLoadError> {
    let (cert, key) = (&files.cert, &files.key);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut authorities = Vec::new();
    let mut hints = Vec::new();
    for (ca, trust_domains) in &files.authorities {
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs(ca)? {
            roots.add(c).map_err(|e| load_err(ca, e))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| load_err(ca, e))?;
        hints.extend(verifier.root_hint_subjects().iter().cloned());
        authorities.push(Authority {
            verifier,
            trust_domains: trust_domains.clone(),
        });
    }
    let verifier = Arc::new(SpiffeClientVerifier { authorities, hints });
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| load_err(cert, e))?
        .with_client_cert_verifier(Arc::clone(&verifier) as Arc<dyn ClientCertVerifier>)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| load_err(key, format!("does not match the certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok((cfg, verifier))
}

/// The server configuration in force, re-read when its files change.
pub struct ReloadingConfig {
    files: TlsFiles,
    all: Vec<PathBuf>,
    state: RwLock<Loaded>,
    /// How many reloads took effect; receivers learn of each.
    reloads: tokio::sync::watch::Sender<u64>,
}

/// The configuration in force, its client verifier, and the files' times it was read at.
struct Loaded {
    server: Arc<ServerConfig>,
    clients: Arc<SpiffeClientVerifier>,
    times: Vec<Option<SystemTime>>,
}

fn mtimes(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

impl ReloadingConfig {
    /// Loads the files once; fails when they do not make a working configuration.
    pub fn new(files: TlsFiles) -> Result<Self, TlsLoadError> {
        let (cfg, clients) = load(&files)?;
        let all = files.all();
        let times = mtimes(&all);
        Ok(Self {
            files,
            all,
            state: RwLock::new(Loaded {
                server: Arc::new(cfg),
                clients,
                times,
            }),
            reloads: tokio::sync::watch::Sender::new(0),
        })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .server
            .clone()
    }

    /// Whether a client chain (leaf first) verifies against the trust in force now; why not.
    pub fn trusts(&self, chain: &[CertificateDer<'_>]) -> Result<(), String> {
        let clients = Arc::clone(
            &self
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clients,
        );
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| "no client certificate".to_string())?;
        clients
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Whether any reload took effect since start (before one, the handshake's verification
    /// still holds).
    pub fn reloaded(&self) -> bool {
        *self.reloads.borrow() > 0
    }

    /// Learns of each reload that takes effect from now on.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// Re-reads the files if any changed. Returns whether a new configuration took effect.
    pub fn reload_if_changed(&self) -> bool {
        let now = mtimes(&self.all);
        {
            let state = self
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if state.times == now {
                return false;
            }
        }
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Whatever happens, do not retry the same files every tick.
        state.times = now;
        match load(&self.files) {
            Ok((cfg, clients)) => {
                state.server = Arc::new(cfg);
                state.clients = clients;
                // Under the lock: a call that sees the new trust also sees it counted.
                self.reloads.send_modify(|n| *n += 1);
                drop(state);
                tracing::info!("TLS certificates reloaded");
                true
            }
            Err(e) => {
                tracing::error!("TLS reload refused, keeping the previous certificates: {e}");
                false
            }
        }
    }

    /// The files this configuration is read from (certificate, key, CAs).
    pub fn files(&self) -> &[PathBuf] {
        &self.all
    }
}
