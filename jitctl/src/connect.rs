//! Reaching the agent (mTLS, or the node-local Unix socket) and saying what went wrong in words
//! that tell the user what to do next.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use jit_api::pb::jit_gate_client::JitGateClient;
use tonic::{
    Code, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use crate::settings::Settings;

/// A client of the agent.
pub(crate) type Client = JitGateClient<Channel>;

fn read(path: &Path, what: &str, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| {
        format!(
            "cannot read your {what} {} (set {flag} or fix the path)",
            path.display()
        )
    })
}

/// Connects to the agent.
pub(crate) async fn connect(s: &Settings) -> anyhow::Result<Client> {
    if let Some(sock) = &s.socket {
        let path = sock.clone();
        let channel = Endpoint::try_from("http://local.agent")?
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .with_context(|| {
                format!(
                    "agent unreachable on its local socket {} (is jit-agent running? are you root?)",
                    sock.display()
                )
            })?;
        return Ok(JitGateClient::new(channel));
    }
    let (Some(cert), Some(key)) = (&s.cert, &s.key) else {
        let file = s
            .file
            .clone()
            .or_else(|| crate::settings::default_files().into_iter().next())
            .map_or_else(|| "jit/config.toml".into(), |p| p.display().to_string());
        bail!(
            "no client certificate found: pass --cert and --key, set JIT_CERT and JIT_KEY, or put \
             cert/key in {file} (try `jit-agent certs init` for a development set)"
        );
    };
    let ca = s.ca.as_ref().ok_or_else(|| {
        anyhow!("no CA bundle for the agent's certificate: pass --ca or set JIT_CA")
    })?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca, "CA bundle", "JIT_CA")?))
        .identity(Identity::from_pem(
            read(cert, "certificate", "JIT_CERT")?,
            read(key, "key", "JIT_KEY")?,
        ));
    let channel = Endpoint::from_shared(s.agent.clone())
        .with_context(|| format!("{:?} is not an agent URL such as https://127.0.0.1:7443", s.agent))?
        .tls_config(tls)
        .context("setting up TLS")?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| {
            anyhow!(
                "agent unreachable at {}: {:#} (is jit-agent running there? check --agent or JIT_AGENT)",
                s.agent,
                anyhow::Error::new(e)
            )
        })?;
    Ok(JitGateClient::new(channel))
}

/// A status as a message that says what to do next.
pub(crate) fn explain(action: &str, st: &Status) -> anyhow::Error {
    let m = st.message();
    match st.code() {
        Code::Unauthenticated => anyhow!(
            "{action}: the agent did not accept your identity: {m} (check JIT_CERT/JIT_KEY and that the certificate is signed by the agent's CA and carries a SPIFFE ID)"
        ),
        Code::PermissionDenied => anyhow!("{action}: permission denied: {m}"),
        Code::InvalidArgument => anyhow!("{action}: invalid input: {m}"),
        Code::NotFound => anyhow!("{action}: not found: {m}"),
        Code::FailedPrecondition => anyhow!("{action}: cannot do that now: {m}"),
        Code::AlreadyExists => anyhow!("{action}: already done: {m}"),
        Code::ResourceExhausted => anyhow!("{action}: a limit is reached: {m}"),
        // The agent answered, but its store or audit log cannot be used right now.
        Code::Unavailable if m.contains("store") || m.contains("audit log") => anyhow!(
            "{action}: the agent cannot do that right now: {m} (retry shortly; `jitctl status` \
             and the agent's /readyz say what is wrong)"
        ),
        Code::Unavailable => anyhow!(
            "{action}: agent unavailable: {m} (is jit-agent running? check --agent or JIT_AGENT)"
        ),
        _ => anyhow!("{action}: {m} ({:?})", st.code()),
    }
}
