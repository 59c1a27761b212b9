//! `jit-agent policy check` and `policy explain`, as a user runs them (no root needed).

use std::{path::PathBuf, process::Command};

const AGENT: &str = env!("CARGO_BIN_EXE_jit-agent");

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn check_accepts_the_examples_and_points_at_mistakes() {
    let out = Command::new(AGENT)
        .args(["policy", "check"])
        .arg(examples().join("policies/policies.cedar"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

    let tmp = jit_tests::TempDir::new("jit-policy-cli-");
    let dir = tmp.path();
    let bad = dir.join("bad.cedar");
    std::fs::write(
        &bad,
        "// one good, one bad\npermit (principal, action == Jit::Action::\"request\", resource);\npermit (principal, action == Jit::Action::\"approve\", resource)\n  when { context.duration > 5 };\n",
    )
    .expect("write");
    let out = Command::new(AGENT)
        .args(["policy", "check"])
        .arg(&bad)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.cedar:4:"),
        "line and column of the mistake: {err}"
    );
    assert!(err.contains("duration"), "{err}");

    let syntax = dir.join("syntax.cedar");
    std::fs::write(&syntax, "permit (principal, action, resource) when {").expect("write");
    let out = Command::new(AGENT)
        .args(["policy", "check"])
        .arg(&syntax)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("syntax.cedar:1:"));
}

#[test]
fn explain_names_the_deciding_policies() {
    let out = Command::new(AGENT)
        .args(["policy", "explain", "--config"])
        .arg(examples().join("agent.toml"))
        .args([
            "--principal",
            "spiffe://example.org/eng/alice",
            "--service",
            "staging-api",
            "--for",
            "10m",
            "--reason",
            "INC-1",
            "--at",
            "2026-11-30T10:00:00Z",
        ])
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("auto_approve  ALLOW permitted by staging-auto-short-working-hours"),
        "{text}"
    );
    assert!(
        text.contains("break_glass   DENY  no policy permits it"),
        "{text}"
    );
    let out = Command::new(AGENT)
        .args(["policy", "explain", "--config"])
        .arg(examples().join("agent.toml"))
        .args(["--principal", "bob", "--service", "staging-api"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--principal"));
}

#[test]
fn check_config_validates_the_named_policies_too() {
    let out = Command::new(AGENT)
        .args(["check-config", "--config"])
        .arg(examples().join("agent.toml"))
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let tmp = jit_tests::TempDir::new("jit-check-config-");
    std::fs::write(
        tmp.path().join("p.cedar"),
        "permit (principal, action == Jit::Action::\"nope\", resource);\n",
    )
    .expect("write");
    std::fs::write(
        tmp.path().join("agent.toml"),
        jit_tests::fixtures::STUB_SECTIONS,
    )
    .expect("write");
    let out = Command::new(AGENT)
        .args(["check-config", "--config"])
        .arg(tmp.path().join("agent.toml"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("p.cedar:1:"), "{err}");
}
