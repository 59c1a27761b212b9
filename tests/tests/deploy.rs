//! `deploy/`: every Kubernetes manifest against the official schemas kept in the repo, the
//! DaemonSet against what the agent needs (and nothing more), the configuration it ships
//! against the agent's own checker, and the Dockerfile against what the release build produces.
//! None of these needs root: the DaemonSet's capabilities and its restart path run for real in
//! `jit-agent/tests/agent_e2e.rs`.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use jit_tests::deploy::{daemonset, dir, manifest};
use serde_json::{Value, json};

/// The schemas the manifests are held to (deploy/schemas/README.md says where they come from).
const SCHEMAS: &str = "schemas/v1.35.0-strict";
/// Where the kind schemas' `$ref`s point (their `$id`s live under https://kubernetes.io/api/).
const DEFINITIONS: &str = "https://kubernetes.io/api/_definitions.json";

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The schema file of a manifest's kind: `daemonset-apps-v1.json`, `configmap-v1.json`.
fn schema_file(doc: &Value) -> Result<String, String> {
    let api = doc["apiVersion"].as_str().ok_or("no apiVersion")?;
    let kind = doc["kind"].as_str().ok_or("no kind")?.to_lowercase();
    Ok(match api.split_once('/') {
        Some((group, version)) => {
            let group = group.split('.').next().unwrap_or(group);
            format!("{kind}-{group}-{version}.json")
        }
        None => format!("{kind}-{api}.json"),
    })
}

/// Every schema error of `doc` ("path: message"); an error when its kind has no schema here.
fn schema_errors(doc: &Value) -> Result<Vec<String>, String> {
    let schemas = dir().join(SCHEMAS);
    let file = schemas.join(schema_file(doc)?);
    if !file.exists() {
        return Err(format!(
            "no schema {} (add it from the same source: deploy/schemas/README.md)",
            file.display()
        ));
    }
    let registry = jsonschema::Registry::new()
        .add(DEFINITIONS, read_json(&schemas.join("_definitions.json")))
        .and_then(jsonschema::RegistryBuilder::prepare)
        .map_err(|e| format!("_definitions.json: {e}"))?;
    let validator = jsonschema::options()
        .with_registry(&registry)
        .build(&read_json(&file))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    Ok(validator
        .iter_errors(doc)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect())
}

/// The files `kubectl apply -k deploy/kubernetes` applies, in order.
fn kustomized() -> Vec<PathBuf> {
    let base = dir().join("kubernetes");
    let k = manifest(&base.join("kustomization.yaml"));
    let fields: BTreeSet<&str> = k
        .as_object()
        .expect("kustomization")
        .keys()
        .map(String::as_str)
        .collect();
    // Only what this test understands: a transformer added to the kustomization would change
    // what is applied without the schemas seeing it.
    assert_eq!(
        fields,
        BTreeSet::from(["apiVersion", "kind", "resources"]),
        "kustomization.yaml uses fields this test does not apply"
    );
    k["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| base.join(r.as_str().expect("resource path")))
        .collect()
}

#[test]
fn every_manifest_matches_the_kubernetes_schemas() {
    let listed = kustomized();
    // Every manifest in the directory is applied, and every applied one exists.
    let mut on_disk: Vec<PathBuf> = std::fs::read_dir(dir().join("kubernetes"))
        .expect("deploy/kubernetes")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .collect();
    on_disk.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(
        sorted, on_disk,
        "kustomization.yaml and deploy/kubernetes differ"
    );

    let mut kinds = BTreeSet::new();
    for file in &listed {
        let doc = manifest(file);
        kinds.insert(doc["kind"].as_str().unwrap_or_default().to_string());
        let errors = schema_errors(&doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert!(
            errors.is_empty(),
            "{} does not match the Kubernetes schema:\n{}",
            file.display(),
            errors.join("\n")
        );
        assert_eq!(
            doc["metadata"]["namespace"].as_str().or(Some("jit-system")),
            Some("jit-system")
        );
    }
    assert_eq!(
        kinds,
        BTreeSet::from(["ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"].map(String::from))
    );
}

/// Where a change is made, and the change.
type Mutation = (&'static str, fn(&mut Value));

/// The validator is strict and follows the schemas' references: a misspelt field, a wrong type
/// deep in the pod template and a missing required field are each caught where they are.
#[test]
fn the_schemas_catch_a_wrong_manifest() {
    let good = daemonset();
    assert_eq!(schema_errors(&good), Ok(vec![]));
    let mutations: [Mutation; 4] = [
        ("/spec/template/spec", |d| {
            d["spec"]["template"]["spec"]["hostNetwrok"] = json!(true);
        }),
        (
            "/spec/template/spec/containers/0/securityContext/capabilities/add",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
                    ["add"] = json!("BPF");
            },
        ),
        (
            "/spec/template/spec/containers/0/ports/0/containerPort",
            |d| {
                d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                    json!("seven");
            },
        ),
        ("/spec", |d| {
            d["spec"].as_object_mut().expect("spec").remove("selector");
        }),
    ];
    for (path, mutate) in mutations {
        let mut bad = good.clone();
        mutate(&mut bad);
        let errors = schema_errors(&bad).expect("schema");
        assert!(
            errors.iter().any(|e| e.starts_with(&format!("{path}:"))),
            "no error at {path}: {errors:?}"
        );
    }
    // A kind without a schema here is refused, never passed.
    assert!(schema_errors(&json!({"apiVersion": "v1", "kind": "Secret"})).is_err());
}

fn agent_container(ds: &Value) -> &Value {
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container: the agent");
    &containers[0]
}

/// The ConfigMap's files, by key.
fn config_files() -> BTreeMap<String, String> {
    let cm = manifest(&dir().join("kubernetes/configmap.yaml"));
    cm["data"]
        .as_object()
        .expect("ConfigMap data")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("text").to_string()))
        .collect()
}

/// Where a path in the container comes from: the volume mounted at the longest prefix of it.
fn volume_of<'a>(ds: &'a Value, path: &str) -> Option<&'a Value> {
    let mounts = agent_container(ds)["volumeMounts"].as_array()?;
    let mount = mounts
        .iter()
        .filter(|m| {
            let at = m["mountPath"].as_str().unwrap_or("/nowhere");
            Path::new(path).starts_with(at)
        })
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))?;
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == mount["name"])
}

/// The DaemonSet gives the agent what it needs to gate the node, and nothing more: the host
/// network and bpffs, three capabilities and no privilege, its configuration and certificates
/// from the ConfigMap and the Secrets at the paths the configuration names, probes on the health
/// endpoints where the configuration serves them, and a rolling update that never surges (the
/// API port is the host's).
#[test]
fn the_daemonset_gives_the_agent_what_it_needs_and_nothing_more() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let agent = agent_container(&ds);
    let sc = &agent["securityContext"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], Value::Null);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let mut caps = jit_tests::deploy::daemonset_capabilities();
    caps.sort();
    assert_eq!(caps, ["BPF", "NET_ADMIN", "PERFMON"]);
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}})
    );

    // The configuration the agent is started with is the ConfigMap's.
    let args: Vec<&str> = agent["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let config_path = args[at + 1];
    let files = config_files();
    let config_volume = volume_of(&ds, config_path).expect("a volume for the configuration");
    assert_eq!(config_volume["configMap"]["name"], "jit-agent-config");
    let key = Path::new(config_path)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name");
    let cfg: toml::Table = toml::from_str(&files[key]).expect("agent.toml");
    let policy = cfg["policy"]["file"].as_str().expect("policy.file");
    assert!(files.contains_key(policy), "the ConfigMap has no {policy}");

    // Host paths that must outlive the pod, and the host's bpffs under the pins.
    let host_path = |p: &str| {
        volume_of(&ds, p).and_then(|v| v["hostPath"]["path"].as_str().map(str::to_string))
    };
    let agent_cfg = &cfg["agent"];
    assert_eq!(
        host_path(agent_cfg["pin_dir"].as_str().expect("pin_dir")).as_deref(),
        Some("/sys/fs/bpf")
    );
    for key in ["state_dir", "unix_socket"] {
        let p = agent_cfg[key].as_str().expect(key);
        assert!(
            host_path(p).is_some(),
            "agent.{key} {p} is not on a host path"
        );
    }
    let audit_dir = cfg["audit"]["dir"].as_str().expect("audit.dir");
    assert!(
        host_path(audit_dir).is_some(),
        "audit.dir {audit_dir} is not on a host path"
    );
    // Certificates and keys from Secrets, read-only.
    for (section, key) in [
        ("tls", "ca"),
        ("tls", "cert"),
        ("tls", "key"),
        ("store", "ca"),
        ("store", "cert"),
        ("store", "key"),
    ] {
        let p = cfg[section][key].as_str().expect("a path");
        let v = volume_of(&ds, p).unwrap_or_else(|| panic!("{section}.{key} {p}: no volume"));
        assert!(
            v["secret"]["secretName"].is_string(),
            "{section}.{key} {p} is not from a Secret"
        );
    }
    // The CAs of client identities are not the Secret of the agent's own certificate (whose
    // issuer, shared, would let anyone it serves mint identities).
    let secret_of = |p: &str| volume_of(&ds, p).map(|v| v["secret"]["secretName"].clone());
    assert_ne!(
        secret_of(cfg["tls"]["ca"].as_str().expect("tls.ca")),
        secret_of(cfg["tls"]["cert"].as_str().expect("tls.cert"))
    );
    assert_eq!(cfg["store"]["backend"].as_str(), Some("etcd"));

    // The API on the host port; probes where the health endpoints listen.
    let listen: std::net::SocketAddr = agent_cfg["listen"]
        .as_str()
        .expect("listen")
        .parse()
        .expect("listen address");
    assert_eq!(agent["ports"][0]["hostPort"], listen.port());
    assert_eq!(agent["ports"][0]["containerPort"], listen.port());
    let metrics: std::net::SocketAddr = agent_cfg["metrics_listen"]
        .as_str()
        .expect("metrics_listen")
        .parse()
        .expect("metrics address");
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], metrics.port(), "{probe}");
        assert_eq!(get["host"], metrics.ip().to_string(), "{probe}");
    }
}

/// The configuration and policies the ConfigMap ships pass the agent's own checks.
#[test]
fn the_shipped_configuration_passes_the_agents_check() {
    let tmp = jit_tests::TempDir::new("jit-deploy-");
    for (name, text) in config_files() {
        std::fs::write(tmp.path().join(&name), text).expect("write");
    }
    let out = Command::new(jit_tests::fixtures::workspace_bin("jit-agent"))
        .args(["check-config", "--config"])
        .arg(tmp.path().join("agent.toml"))
        .output()
        .expect("jit-agent check-config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("store: etcd at https://"), "{stdout}");
    assert!(stdout.contains("service deploy-api"), "{stdout}");
}

/// One instruction of a Dockerfile: keyword and the rest (continuations joined).
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                let (kw, rest) = current.split_once(' ').unwrap_or((&current, ""));
                out.push((kw.to_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// The bin targets of `packages`, by `cargo metadata`.
fn bin_targets(packages: &[String]) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(dir().join(".."))
        .output()
        .expect("cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("metadata");
    let mut bins = BTreeSet::new();
    for p in meta["packages"].as_array().expect("packages") {
        if !packages.iter().any(|name| p["name"] == name.as_str()) {
            continue;
        }
        for t in p["targets"].as_array().expect("targets") {
            if t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
            {
                bins.insert(t["name"].as_str().expect("name").to_string());
            }
        }
    }
    bins
}

/// No image can be built here (no registry): the Dockerfile keeps to the standard form, and
/// every file its runtime stage copies out of the build stage is a binary of a package the build
/// stage's `cargo build --release` builds; the entry point is one of them.
#[test]
fn the_dockerfile_copies_only_what_the_release_build_produces() {
    let text = std::fs::read_to_string(dir().join("Dockerfile")).expect("deploy/Dockerfile");
    let steps = instructions(&text);
    let stages: Vec<&(String, String)> = steps.iter().filter(|(k, _)| k == "FROM").collect();
    assert_eq!(stages.len(), 2, "a build stage and a runtime stage");
    let build_stage = stages[0].1.rsplit(' ').next().expect("stage name");
    assert!(stages[0].1.contains(" AS "), "the build stage is named");

    let mut workdir = String::new();
    let mut built: Option<Vec<String>> = None;
    let mut copied = Vec::new();
    let mut stage = 0;
    for (kw, rest) in &steps {
        match kw.as_str() {
            "FROM" => stage += 1,
            "WORKDIR" if stage == 1 => workdir = rest.clone(),
            "RUN" if stage == 1 => {
                for cmd in rest.split("&&").map(str::trim) {
                    if !cmd.starts_with("cargo build") {
                        continue;
                    }
                    let words: Vec<&str> = cmd.split_whitespace().collect();
                    assert!(words.contains(&"--release"), "{cmd}: not a release build");
                    assert!(
                        words.contains(&"--locked"),
                        "{cmd}: not locked to Cargo.lock"
                    );
                    let packages = words
                        .windows(2)
                        .filter(|w| w[0] == "--package" || w[0] == "-p")
                        .map(|w| w[1].to_string())
                        .collect();
                    built = Some(packages);
                }
            }
            "COPY" if stage == 2 => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let from = format!("--from={build_stage}");
                assert_eq!(
                    words.first(),
                    Some(&from.as_str()),
                    "runtime COPY not from the build: {rest}"
                );
                assert_eq!(words.len(), 3, "one file per COPY: {rest}");
                copied.push((words[1].to_string(), words[2].to_string()));
            }
            "ADD" => panic!("ADD fetches or unpacks: use COPY ({rest})"),
            _ => {}
        }
    }
    let packages = built.expect("a cargo build in the build stage");
    let bins = bin_targets(&packages);
    assert!(
        bins.contains("jit-agent") && bins.contains("jitctl"),
        "{bins:?}"
    );
    let release = format!("{}/target/release/", workdir.trim_end_matches('/'));
    assert!(!copied.is_empty());
    for (from, _) in &copied {
        let name = from
            .strip_prefix(&release)
            .unwrap_or_else(|| panic!("{from} is not in {release}"));
        assert!(
            bins.contains(name),
            "{from}: not a binary of {packages:?} (they build {bins:?})"
        );
    }
    let entry = steps
        .iter()
        .rev()
        .find(|(k, _)| k == "ENTRYPOINT")
        .map(|(_, r)| r.clone())
        .expect("ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(&entry).expect("ENTRYPOINT in exec form");
    assert!(
        copied.iter().any(|(_, to)| *to == entry[0]),
        "the entry point {} is not a copied binary",
        entry[0]
    );
    // The image the DaemonSet runs uses that entry point with the DaemonSet's own arguments.
    let ds = daemonset();
    assert_eq!(
        agent_container(&ds)["command"],
        Value::Null,
        "the DaemonSet keeps the entry point"
    );
}
