//! Connection settings. Flags come first, then the environment (both read by clap: `--agent` or
//! `JIT_AGENT`, and so on), then the settings file, then the defaults. The settings file is
//! `jit/config.toml` in the platform's configuration directory (`$XDG_CONFIG_HOME`, else
//! `~/.config`, on Linux), or the file `--config`/`JITCTL_CONFIG` names, with the keys `agent`,
//! `cert`, `key`, `ca` and `socket`.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The agent jitctl talks to when nothing names one.
pub(crate) const DEFAULT_AGENT: &str = "https://127.0.0.1:7443";

/// Connection flags, accepted before or after the command.
#[derive(Debug, Default, clap::Args)]
#[command(next_help_heading = "Connection")]
pub(crate) struct ConnectionArgs {
    /// Agent URL [default: https://127.0.0.1:7443]
    #[arg(long, global = true, env = "JIT_AGENT", value_name = "URL")]
    agent: Option<String>,
    /// Your client certificate (PEM) with your SPIFFE ID.
    #[arg(long, global = true, env = "JIT_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Your private key (PEM).
    #[arg(long, global = true, env = "JIT_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// CA bundle (PEM) that signed the agent's certificate.
    #[arg(long, global = true, env = "JIT_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Talk to the agent's local Unix socket instead (root, node-local administration).
    #[arg(long, global = true, env = "JIT_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Settings file [default: jit/config.toml in your configuration directory, e.g.
    /// ~/.config/jit/config.toml]
    #[arg(
        long = "config",
        global = true,
        env = "JITCTL_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,
}

/// The settings file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    agent: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    socket: Option<PathBuf>,
}

/// Resolved connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Agent URL.
    pub(crate) agent: String,
    /// Client certificate.
    pub(crate) cert: Option<PathBuf>,
    /// Client key.
    pub(crate) key: Option<PathBuf>,
    /// CA bundle.
    pub(crate) ca: Option<PathBuf>,
    /// Unix socket.
    pub(crate) socket: Option<PathBuf>,
}

/// `jit/config.toml` in the platform's configuration directory.
pub(crate) fn default_file() -> Option<PathBuf> {
    dirs::config_dir().map(|d| d.join("jit").join("config.toml"))
}

fn read_file(path: &Path) -> anyhow::Result<FileSettings> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}", path.display()))
}

impl ConnectionArgs {
    /// Fills what flags and environment left open from the settings file, then the defaults.
    pub(crate) fn resolve(self) -> anyhow::Result<Settings> {
        let file = match (&self.config, default_file()) {
            (Some(explicit), _) => {
                if !explicit.exists() {
                    bail!(
                        "the settings file {} does not exist (named by --config or JITCTL_CONFIG)",
                        explicit.display()
                    );
                }
                read_file(explicit)?
            }
            (None, Some(default)) if default.exists() => read_file(&default)?,
            (None, _) => FileSettings::default(),
        };
        Ok(Settings {
            agent: self
                .agent
                .or(file.agent)
                .unwrap_or_else(|| DEFAULT_AGENT.into()),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            ca: self.ca.or(file.ca),
            socket: self.socket.or(file.socket),
        })
    }
}
