//! mTLS for the gRPC listener: client certificates must chain to the trust bundle, be within
//! their validity, and carry exactly one SPIFFE ID; anything else is refused at the handshake.
//! Certificate, key and bundle are re-read when their files change, so rotation needs no
//! restart; a set of files that does not load is refused and the previous one stays in force.

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

/// Wraps the WebPKI verifier with the SPIFFE ID requirement.
#[derive(Debug)]
struct SpiffeClientVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let ok = self.0.verify_client_cert(end_entity, intermediates, now)?;
        spiffe_id_from_der(end_entity).map_err(TlsError::General)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Builds the server configuration from the three files.
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<ServerConfig, TlsLoadError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| load_err(ca, e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| load_err(ca, e))?;
    let verifier = Arc::new(SpiffeClientVerifier(webpki));
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| load_err(cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| load_err(key, format!("does not match the certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The server configuration in force, re-read when its files change.
pub struct ReloadingConfig {
    files: [PathBuf; 3],
    state: RwLock<(Arc<ServerConfig>, Vec<Option<SystemTime>>)>,
}

fn mtimes(files: &[PathBuf; 3]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

impl ReloadingConfig {
    /// Loads the files once; fails when they do not make a working configuration.
    pub fn new(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsLoadError> {
        let files = [ca.to_path_buf(), cert.to_path_buf(), key.to_path_buf()];
        let cfg = server_config(ca, cert, key)?;
        let times = mtimes(&files);
        Ok(Self {
            files,
            state: RwLock::new((Arc::new(cfg), times)),
        })
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .clone()
    }

    /// Re-reads the files if any changed. Returns whether a new configuration took effect.
    pub fn reload_if_changed(&self) -> bool {
        let now = mtimes(&self.files);
        {
            let state = self
                .state
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if state.1 == now {
                return false;
            }
        }
        let [ca, cert, key] = &self.files;
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Whatever happens, do not retry the same files every tick.
        state.1 = now;
        match server_config(ca, cert, key) {
            Ok(cfg) => {
                state.0 = Arc::new(cfg);
                tracing::info!("TLS certificates reloaded");
                true
            }
            Err(e) => {
                tracing::error!("TLS reload refused, keeping the previous certificates: {e}");
                false
            }
        }
    }

    /// The files this configuration is read from (CA bundle, certificate, key).
    pub fn files(&self) -> &[PathBuf; 3] {
        &self.files
    }
}
