//! `jit-agent certs init`: a development CA, the agent's certificate and named identity
//! certificates with SPIFFE IDs, for trying JIT Gate out. Production uses your own PKI (SPIRE,
//! cert-manager ...); the agent only needs a CA bundle and its own certificate and key.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::identity::check_spiffe_id;

/// What to make.
#[derive(Debug, Clone)]
pub struct CertsPlan {
    /// Output directory.
    pub dir: PathBuf,
    /// SPIFFE trust domain, e.g. `example.org`.
    pub trust_domain: String,
    /// Host names and addresses the agent is reached at (besides localhost).
    pub hosts: Vec<String>,
    /// Identity paths, e.g. `alice`, `ci/deployer` → `spiffe://<domain>/<path>`.
    pub identities: Vec<String>,
    /// Validity in days.
    pub days: u32,
}

/// Files written, for the caller to print.
pub struct Written {
    /// Paths in writing order.
    pub files: Vec<PathBuf>,
}

fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn params(cn: &str, days: u32) -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "JIT Gate development");
    p.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + time::Duration::days(i64::from(days));
    Ok(p)
}

/// File stem for an identity path (`ci/deployer` → `ci_deployer`).
#[must_use]
pub fn file_stem(identity: &str) -> String {
    identity.replace('/', "_")
}

/// Makes the CA, the agent certificate and one certificate per identity. Refuses to overwrite
/// an existing CA.
pub fn init(plan: &CertsPlan) -> anyhow::Result<Written> {
    if plan.days == 0 {
        bail!("--days must be at least 1");
    }
    check_spiffe_id(&format!("spiffe://{}/agent", plan.trust_domain))
        .map_err(|e| anyhow::anyhow!("--trust-domain: {e}"))?;
    for id in &plan.identities {
        check_spiffe_id(&format!("spiffe://{}/{id}", plan.trust_domain))
            .map_err(|e| anyhow::anyhow!("--identity {id:?}: {e}"))?;
    }
    std::fs::create_dir_all(&plan.dir)
        .with_context(|| format!("creating {}", plan.dir.display()))?;
    let ca_pem = plan.dir.join("ca.pem");
    if ca_pem.exists() {
        bail!(
            "{} exists; refusing to replace a CA (remove the directory to start over)",
            ca_pem.display()
        );
    }
    let mut files = Vec::new();

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = params("JIT Gate development CA", plan.days)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).context("signing the CA")?;
    std::fs::write(&ca_pem, ca_cert.pem())
        .with_context(|| format!("writing {}", ca_pem.display()))?;
    write_private(&plan.dir.join("ca.key"), &ca_key.serialize_pem())?;
    files.push(ca_pem);
    files.push(plan.dir.join("ca.key"));
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str, uri: String, server: bool, extra: &[String]| -> anyhow::Result<()> {
        let key = KeyPair::generate()?;
        let mut p = params(name, plan.days)?;
        p.subject_alt_names
            .push(SanType::URI(uri.as_str().try_into()?));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if server {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
            for h in extra {
                match h.parse::<IpAddr>() {
                    Ok(ip) => p.subject_alt_names.push(SanType::IpAddress(ip)),
                    Err(_) => p
                        .subject_alt_names
                        .push(SanType::DnsName(h.as_str().try_into()?)),
                }
            }
        }
        let cert = p.signed_by(&key, &issuer)?;
        let stem = file_stem(name);
        let pem = plan.dir.join(format!("{stem}.pem"));
        std::fs::write(&pem, cert.pem()).with_context(|| format!("writing {}", pem.display()))?;
        write_private(&plan.dir.join(format!("{stem}.key")), &key.serialize_pem())?;
        Ok(())
    };

    let mut hosts = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    hosts.extend(plan.hosts.iter().cloned());
    leaf(
        "agent",
        format!("spiffe://{}/agent", plan.trust_domain),
        true,
        &hosts,
    )?;
    files.push(plan.dir.join("agent.pem"));
    files.push(plan.dir.join("agent.key"));
    for id in &plan.identities {
        leaf(
            id,
            format!("spiffe://{}/{id}", plan.trust_domain),
            false,
            &[],
        )?;
        files.push(plan.dir.join(format!("{}.pem", file_stem(id))));
        files.push(plan.dir.join(format!("{}.key", file_stem(id))));
    }
    Ok(Written { files })
}
