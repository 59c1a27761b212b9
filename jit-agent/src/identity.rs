//! Who is calling: the SPIFFE ID in an mTLS client certificate, or the local operator on the
//! Unix socket.

use x509_parser::{extensions::GeneralName, prelude::FromDer as _};

/// The authenticated caller of an API method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An mTLS client with this SPIFFE ID.
    Spiffe(String),
    /// A local process on the Unix socket, by user id. Only root is accepted there.
    Local {
        /// Its user id.
        uid: u32,
    },
}

impl Caller {
    /// The identity as written in records and shown to people.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Self::Spiffe(id) => id.clone(),
            Self::Local { uid } => format!("local:uid={uid}"),
        }
    }
}

/// Checks the form `spiffe://trust-domain/path` (SPIFFE ID standard: lowercase trust domain of
/// letters, digits, '.', '-', '_'; a non-empty path of segments; no query or fragment).
pub fn check_spiffe_id(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("{s:?} is not a SPIFFE ID (spiffe://trust-domain/path)"))?;
    let (domain, path) = rest
        .split_once('/')
        .ok_or_else(|| format!("{s:?} has no path after the trust domain"))?;
    if domain.is_empty()
        || !domain
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || ".-_".contains(c))
    {
        return Err(format!(
            "{s:?}: trust domain {domain:?} must be lowercase letters, digits, '.', '-' or '_'"
        ));
    }
    if path.is_empty()
        || path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || !path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/.-_".contains(c))
    {
        return Err(format!(
            "{s:?}: path must be non-empty segments of letters, digits, '.', '-' or '_'"
        ));
    }
    Ok(())
}

/// The SPIFFE ID in a DER certificate's URI SAN. Exactly one `spiffe://` URI is required.
pub fn spiffe_id_from_der(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("the certificate has no subjectAltName with a SPIFFE ID")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => {
            check_spiffe_id(one)?;
            Ok((*one).to_string())
        }
        [] => Err("the certificate has no spiffe:// URI SAN".into()),
        _ => Err("the certificate has more than one spiffe:// URI SAN".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        assert!(check_spiffe_id("spiffe://example.org/ci/deployer").is_ok());
        for bad in [
            "http://example.org/x",
            "spiffe://example.org",
            "spiffe://example.org/",
            "spiffe://Example.org/x",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?b",
        ] {
            assert!(check_spiffe_id(bad).is_err(), "{bad}");
        }
    }
}
