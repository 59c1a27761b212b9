//! Connection settings. Flags come first, then the environment (both read by clap: `--agent` or
//! `JIT_AGENT`, and so on), then the settings file, then the defaults. The settings file is
//! `jit/config.toml` in the platform's configuration directory (`$XDG_CONFIG_HOME`, else
//! `~/.config`, on Linux; `~/Library/Application Support` on macOS), else `~/.config/jit/config.toml`
//! where earlier versions read it, or the file `--config`/`JITCTL_CONFIG` names, with the keys
//! `agent`, `cert`, `key`, `ca` and `socket`. An agent named by flag or environment wins over a
//! socket named only in the file.

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
    /// Your private key (PEM). For `audit verify`: the node's audit public key (hex, or a file
    /// holding it), from the command line only.
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
    /// The settings file read, if any.
    pub(crate) file: Option<PathBuf>,
}

/// Where the settings file is looked for, in order: `jit/config.toml` in the platform's
/// configuration directory, then `~/.config/jit/config.toml` (where earlier versions read it).
pub(crate) fn default_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = dirs::config_dir()
        .map(|d| d.join("jit").join("config.toml"))
        .into_iter()
        .collect();
    if let Some(legacy) = dirs::home_dir().map(|h| h.join(".config/jit/config.toml"))
        && !files.contains(&legacy)
    {
        files.push(legacy);
    }
    files
}

fn read_file(path: &Path) -> anyhow::Result<FileSettings> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("{}", path.display()))
}

impl ConnectionArgs {
    /// `--key` as given on the command line (not from the environment or a file).
    pub(crate) fn key_from_command_line(&self, matches: &clap::ArgMatches) -> Option<PathBuf> {
        let given = |m: &clap::ArgMatches| {
            m.value_source("key") == Some(clap::parser::ValueSource::CommandLine)
        };
        let mut m = matches;
        let mut on_line = given(m);
        while let Some((_, sub)) = m.subcommand() {
            on_line |= given(sub);
            m = sub;
        }
        if on_line { self.key.clone() } else { None }
    }

    /// Fills what flags and environment left open from the settings file, then the defaults.
    pub(crate) fn resolve(self) -> anyhow::Result<Settings> {
        let path = match &self.config {
            Some(explicit) => {
                if !explicit.exists() {
                    bail!(
                        "the settings file {} does not exist (named by --config or JITCTL_CONFIG)",
                        explicit.display()
                    );
                }
                Some(explicit.clone())
            }
            None => default_files().into_iter().find(|f| f.exists()),
        };
        let file = match &path {
            Some(p) => read_file(p)?,
            None => FileSettings::default(),
        };
        // A socket from the file yields to an agent named on the command line or environment.
        let socket = self.socket.or(if self.agent.is_some() {
            None
        } else {
            file.socket
        });
        Ok(Settings {
            agent: self
                .agent
                .or(file.agent)
                .unwrap_or_else(|| DEFAULT_AGENT.into()),
            cert: self.cert.or(file.cert),
            key: self.key.or(file.key),
            ca: self.ca.or(file.ca),
            socket,
            file: path,
        })
    }
}
