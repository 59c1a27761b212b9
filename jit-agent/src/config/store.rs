//! `[store]`: where requests, grants and numeric ids live. The embedded redb file for one node
//! (the default); etcd for agents on many nodes sharing one state.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::fields::Dur;
use crate::store::EtcdOptions;

/// Which store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The embedded redb file in the state directory (one node).
    #[default]
    Redb,
    /// An etcd cluster (many nodes).
    Etcd,
}

/// `[store]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// `redb` (default) or `etcd`.
    pub backend: Option<Backend>,
    /// How long closed records (ended grants, decided or expired requests) are kept before they
    /// are pruned; both backends. Default `30d`, at least `1m`.
    pub retention: Option<Dur>,
    /// etcd client URLs, `http://host:2379` or `https://host:2379`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Key prefix of this deployment's records. Default `/jit/`.
    pub prefix: Option<String>,
    /// How long one store call may take. Default `5s`.
    pub timeout: Option<Dur>,
    /// CA of the etcd servers' certificates (PEM); required for `https` endpoints.
    pub ca: Option<PathBuf>,
    /// Client certificate for etcd (PEM), with `key`.
    pub cert: Option<PathBuf>,
    /// Client key for etcd (PEM), with `cert`.
    pub key: Option<PathBuf>,
}

/// The store, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// `<state_dir>/state.redb`.
    Redb,
    /// An etcd cluster.
    Etcd(EtcdConfig),
}

/// How to reach etcd, validated (files are read when the agent connects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, ending with `/`.
    pub prefix: String,
    /// Bound on one store call.
    pub timeout: Duration,
    /// CA file.
    pub ca: Option<PathBuf>,
    /// Client certificate and key files.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl EtcdConfig {
    /// The client options, with the TLS files read.
    pub fn options(&self) -> anyhow::Result<EtcdOptions> {
        use anyhow::Context as _;
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the etcd {what} {}", p.display()))
        };
        Ok(EtcdOptions {
            endpoints: self.endpoints.clone(),
            prefix: self.prefix.clone(),
            timeout: self.timeout,
            ca: self.ca.as_ref().map(|p| read(p, "CA")).transpose()?,
            identity: match &self.identity {
                Some((c, k)) => Some((read(c, "client certificate")?, read(k, "client key")?)),
                None => None,
            },
        })
    }
}

/// Default of `store.retention`.
const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// `store.retention`, validated: at least a minute.
pub(super) fn retention(s: &StoreSection) -> Result<Duration, (&'static str, String)> {
    let r = s.retention.map_or(DEFAULT_RETENTION, |d| d.0);
    if r < Duration::from_secs(60) {
        return Err((
            "store.retention",
            format!(
                "{} is shorter than a minute; records are kept at least that long (the audit \
                 log keeps the history)",
                jit_api::duration::format_duration(r)
            ),
        ));
    }
    Ok(r)
}

/// Validates `[store]` with the flags' overrides (`--store`, `--etcd-endpoint`); an error names
/// the field. Relative paths are relative to the configuration file.
pub(super) fn validate(
    file: &Path,
    s: StoreSection,
    backend: Option<Backend>,
    endpoints: &[String],
) -> Result<StoreConfig, (&'static str, String)> {
    let backend = backend.or(s.backend).unwrap_or_default();
    let endpoints = if endpoints.is_empty() {
        s.endpoints
    } else {
        endpoints.to_vec()
    };
    if backend == Backend::Redb {
        let etcd_only = !endpoints.is_empty()
            || s.prefix.is_some()
            || s.ca.is_some()
            || s.cert.is_some()
            || s.key.is_some();
        if etcd_only {
            return Err((
                "store.backend",
                "etcd settings are given but the backend is redb; set backend = \"etcd\"".into(),
            ));
        }
        return Ok(StoreConfig::Redb);
    }
    if endpoints.is_empty() {
        return Err((
            "store.endpoints",
            "the etcd backend needs at least one endpoint (http://host:2379)".into(),
        ));
    }
    let mut https = false;
    for e in &endpoints {
        let rest = if let Some(r) = e.strip_prefix("https://") {
            https = true;
            r
        } else if let Some(r) = e.strip_prefix("http://") {
            r
        } else {
            return Err((
                "store.endpoints",
                format!("{e:?} is not an http:// or https:// URL"),
            ));
        };
        if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
            return Err((
                "store.endpoints",
                format!("{e:?} must be scheme://host:port, nothing more"),
            ));
        }
    }
    if https && endpoints.iter().any(|e| e.starts_with("http://")) {
        return Err((
            "store.endpoints",
            "mixes http:// and https:// endpoints".into(),
        ));
    }
    let prefix = s.prefix.unwrap_or_else(|| "/jit/".into());
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
        return Err((
            "store.prefix",
            format!("{prefix:?} must start and end with '/' and name something (\"/jit/\")"),
        ));
    }
    let resolve = |p: PathBuf| super::resolve(file, p);
    let ca = s.ca.map(resolve);
    if https && ca.is_none() {
        return Err((
            "store.ca",
            "https endpoints need the CA that signs the etcd servers' certificates".into(),
        ));
    }
    if !https && ca.is_some() {
        return Err(("store.ca", "is given but the endpoints are http://".into()));
    }
    let identity = match (s.cert, s.key) {
        (Some(c), Some(k)) if https => Some((resolve(c), resolve(k))),
        (Some(_), Some(_)) => {
            return Err((
                "store.cert",
                "a client certificate needs https:// endpoints".into(),
            ));
        }
        (None, None) => None,
        _ => return Err(("store.cert", "cert and key go together".into())),
    };
    Ok(StoreConfig::Etcd(EtcdConfig {
        endpoints,
        prefix,
        timeout: s.timeout.map_or(Duration::from_secs(5), |d| d.0),
        ca,
        identity,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_defaults_to_30_days_and_is_at_least_a_minute() {
        assert_eq!(retention(&parse("")), Ok(DEFAULT_RETENTION));
        assert_eq!(
            retention(&parse("retention = \"7d\"")),
            Ok(Duration::from_secs(7 * 86_400))
        );
        let (field, message) = retention(&parse("retention = \"30s\"")).expect_err("too short");
        assert_eq!(field, "store.retention");
        assert!(message.contains("shorter than a minute"), "{message}");
        // Valid for redb as for etcd: not an etcd-only setting.
        assert_eq!(check("retention = \"1h\""), Ok(StoreConfig::Redb));
    }

    fn parse(toml_text: &str) -> StoreSection {
        toml::from_str(toml_text).expect("section")
    }

    fn check(toml_text: &str) -> Result<StoreConfig, (&'static str, String)> {
        validate(
            Path::new("/etc/jit/agent.toml"),
            parse(toml_text),
            None,
            &[],
        )
    }

    #[test]
    fn redb_is_the_default_and_refuses_etcd_settings() {
        assert_eq!(check(""), Ok(StoreConfig::Redb));
        let (field, message) = check("endpoints = [\"http://127.0.0.1:2379\"]").unwrap_err();
        assert_eq!(field, "store.backend");
        assert!(message.contains("backend = \"etcd\""), "{message}");
    }

    #[test]
    fn etcd_settings_are_checked_and_paths_resolved() {
        let ok = check(
            "backend = \"etcd\"\nendpoints = [\"https://e0:2379\", \"https://e1:2379\"]\n\
             ca = \"ca.pem\"\ncert = \"/abs/c.pem\"\nkey = \"k.pem\"\ntimeout = \"2s\"\n",
        )
        .expect("valid");
        let StoreConfig::Etcd(e) = ok else {
            panic!("etcd expected")
        };
        assert_eq!(e.prefix, "/jit/");
        assert_eq!(e.timeout, Duration::from_secs(2));
        assert_eq!(e.ca.as_deref(), Some(Path::new("/etc/jit/ca.pem")));
        assert_eq!(
            e.identity,
            Some(("/abs/c.pem".into(), "/etc/jit/k.pem".into()))
        );
        for (text, field) in [
            ("backend = \"etcd\"", "store.endpoints"),
            (
                "backend = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]",
                "store.endpoints",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"http://h:1/x\"]",
                "store.endpoints",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"http://h:1\", \"https://h:2\"]",
                "store.endpoints",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"https://h:1\"]",
                "store.ca",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"http://h:1\"]\nca = \"ca.pem\"",
                "store.ca",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"https://h:1\"]\nca = \"a\"\ncert = \"c\"",
                "store.cert",
            ),
            (
                "backend = \"etcd\"\nendpoints = [\"http://h:1\"]\nprefix = \"jit\"",
                "store.prefix",
            ),
        ] {
            assert_eq!(check(text).map_err(|e| e.0), Err(field), "{text}");
        }
    }

    #[test]
    fn flags_override_the_file() {
        let c = validate(
            Path::new("a.toml"),
            parse(""),
            Some(Backend::Etcd),
            &["http://127.0.0.1:2379".into()],
        )
        .expect("valid");
        assert!(matches!(c, StoreConfig::Etcd(e) if e.endpoints == ["http://127.0.0.1:2379"]));
    }
}
