//! jitctl's own behaviour, without an agent: exit codes of usage errors, input checked before
//! anything is sent, and where connection settings come from (flag, environment, settings file in
//! the platform's configuration directory).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

const JITCTL: &str = env!("CARGO_BIN_EXE_jitctl");

/// A scratch directory standing in for a home, removed on drop.
struct Home(PathBuf);

impl Home {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("jitctl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        // Files that exist; their content is never parsed before the agent URL is.
        for f in ["ca.pem", "me.pem", "me.key"] {
            std::fs::write(p.join(f), "x").expect("write");
        }
        Self(p)
    }

    fn settings(&self, dir: &Path, agent: &str) {
        std::fs::create_dir_all(dir.join("jit")).expect("dir");
        let h = self.0.display();
        std::fs::write(
            dir.join("jit/config.toml"),
            format!(
                "agent = {agent:?}\ncert = \"{h}/me.pem\"\nkey = \"{h}/me.key\"\nca = \"{h}/ca.pem\"\n"
            ),
        )
        .expect("settings");
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// jitctl with a clean environment: only HOME (and what `env` adds).
fn jitctl(home: &Home, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(JITCTL);
    cmd.env_clear()
        .env("HOME", &home.0)
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).output().expect("running jitctl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn usage_errors_exit_1_never_the_denied_code() {
    let home = Home::new("usage");
    let help = jitctl(&home, &[], &["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("XDG_CONFIG_HOME"),
        "the help names where settings come from"
    );
    for args in [
        &["frobnicate"][..],
        &["request", "db"][..],
        &["request", "db", "--for", "0s"][..],
        &["request", "db", "--for", "soon"][..],
        &["request", "db", "--for", "5m", "--wait", "--timeout", "-1m"][..],
        &["ls", "everything"][..],
        &["revoke"][..],
    ] {
        let out = jitctl(&home, &[], args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).is_empty(), "{args:?} says why");
    }
    let out = jitctl(&home, &[], &["request", "db", "--for", "0s"]);
    assert!(stderr(&out).contains("is zero"), "{}", stderr(&out));
}

#[test]
fn settings_come_from_flag_then_environment_then_the_config_directory() {
    let home = Home::new("layers");
    let xdg = home.0.join("xdg");
    home.settings(&xdg, "file agent");
    let xdg_env = ("XDG_CONFIG_HOME", xdg.to_str().expect("utf-8"));
    // The agent URL is checked after the files are read, so its error names which one won.
    let out = jitctl(&home, &[xdg_env], &["whoami"]);
    assert!(stderr(&out).contains("\"file agent\""), "{}", stderr(&out));
    let out = jitctl(&home, &[xdg_env, ("JIT_AGENT", "env agent")], &["whoami"]);
    assert!(stderr(&out).contains("\"env agent\""), "{}", stderr(&out));
    let out = jitctl(
        &home,
        &[xdg_env, ("JIT_AGENT", "env agent")],
        &["whoami", "--agent", "flag agent"],
    );
    assert!(stderr(&out).contains("\"flag agent\""), "{}", stderr(&out));

    // Without XDG_CONFIG_HOME, ~/.config.
    home.settings(&home.0.join(".config"), "home agent");
    let out = jitctl(&home, &[], &["whoami"]);
    assert!(stderr(&out).contains("\"home agent\""), "{}", stderr(&out));

    // A socket named only in the file yields to an agent named on the command line or environment.
    let with_socket = home.0.join("socket.toml");
    std::fs::write(&with_socket, "socket = \"/nonexistent/agent.sock\"\n").expect("write");
    let file = ("JITCTL_CONFIG", with_socket.to_str().expect("utf-8"));
    let out = jitctl(&home, &[file], &["whoami"]);
    assert!(
        stderr(&out).contains("local socket /nonexistent/agent.sock"),
        "{}",
        stderr(&out)
    );
    let out = jitctl(&home, &[file], &["whoami", "--agent", "flag agent"]);
    assert!(
        stderr(&out).contains("no client certificate found")
            && stderr(&out).contains("socket.toml"),
        "the flag's agent is used, and the message names the file read: {}",
        stderr(&out)
    );

    // A file named explicitly must exist; a file with unknown keys is refused, naming it.
    let out = jitctl(&home, &[], &["whoami", "--config", "/nonexistent/jit.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/jit.toml"),
        "{}",
        stderr(&out)
    );
    let bad = home.0.join("bad.toml");
    std::fs::write(&bad, "agnet = \"x\"\n").expect("write");
    let out = jitctl(
        &home,
        &[("JITCTL_CONFIG", bad.to_str().expect("utf-8"))],
        &["whoami"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("bad.toml") && stderr(&out).contains("agnet"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn without_a_certificate_it_says_how_to_get_one() {
    let home = Home::new("nocert");
    let out = jitctl(&home, &[], &["whoami"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no client certificate found")
            && stderr(&out).contains(".config/jit/config.toml"),
        "{}",
        stderr(&out)
    );
}
