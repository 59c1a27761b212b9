//! `jit-agent run`: load the config, open the store, reconcile the kernel with it, attach the
//! gate, then serve the API over mTLS (TCP) and a root-only Unix socket. On SIGTERM or SIGINT
//! the API stops and the gate stays attached and enforcing (its links are pinned).

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use jit_api::pb::{FILE_DESCRIPTOR_SET, jit_gate_server::JitGateServer};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};

use jit_api::audit::{Event as AuditEvent, FileDigest};

use crate::{
    api::{Api, tls::ReloadingConfig},
    attach::Attacher,
    audit::{AuditLog, AuditOptions},
    config::{Config, StoreConfig},
    datapath::{Gate, GateMaps, LoadOptions},
    denials::DenialReader,
    engine::Engine,
    file_watch::{FileWatch, Subscriber},
    kernel_sync::KernelSync,
    node::Node,
    notify::Notifier,
    policy::Policies,
    store::{EtcdStore, RedbStore, Store},
};

/// How often expired grants and requests are swept.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// How often the kernel maps are reconciled with the store (and at once after a failed write).
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// Removes the maps of an older layout once every pinned link runs this layout's program, which
/// holds when every pinned link is on a configured interface (each was swapped at start). A link
/// on an interface this agent does not manage keeps the old program and its maps: they stay, and
/// the agent says so.
fn remove_old_layout(cfg: &Config) -> anyhow::Result<()> {
    let unmanaged: Vec<String> = crate::datapath::attachments(&cfg.pin_dir)
        .context("listing the pinned links")?
        .into_iter()
        .filter(|a| {
            !cfg.interfaces
                .iter()
                .any(|(iface, _)| *iface == a.interface)
        })
        .map(|a| format!("{}/{}", a.interface, a.hook))
        .collect();
    if !unmanaged.is_empty() {
        tracing::warn!(
            "links pinned on interfaces not in the configuration ({}) keep their program; maps of \
             older layouts are kept for them (detach them with `jit-agent bpf detach`)",
            unmanaged.join(", ")
        );
        return Ok(());
    }
    for stale in crate::datapath::remove_stale_layouts(&cfg.pin_dir)
        .context("removing the maps of an older layout")?
    {
        tracing::info!("removed {} (an older map layout)", stale.display());
    }
    Ok(())
}

/// How long calls in flight may take to finish at shutdown, before the audit log is sealed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often held audit records are retried and time-due checkpoints written.
const AUDIT_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// This node's name on its audit records (the host name).
fn node_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".into())
}

/// A file and the SHA-256 of its content (empty when it cannot be read, which is on the record).
fn digest(path: &std::path::Path) -> FileDigest {
    FileDigest {
        path: path.display().to_string(),
        sha256: std::fs::read(path)
            .map(|b| jit_api::audit::content_hash(&b))
            .unwrap_or_default(),
    }
}

/// Grants stored but never issued (no durable audit record) for this long are revoked: they are
/// stuck, not about to be issued by another agent sharing the store.
const UNISSUED_GRACE: Duration = Duration::from_secs(30);

/// Sweeps between two looks for stuck unissued grants (10 s).
const UNISSUED_EVERY: u64 = 20;
/// How often old records are pruned (the first pass at start).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Prunes closed records past `retention`; failures are logged (the next minute tries again).
fn prune<S: Store>(node: &Node<S>, retention: Duration) {
    match node.prune(retention) {
        Ok(0) => {}
        Ok(n) => tracing::info!("pruned {n} closed record(s) older than the store's retention"),
        Err(e) => tracing::warn!("pruning old records failed: {e}; trying again in a minute"),
    }
}

/// Revokes grants left unissued for [`UNISSUED_GRACE`] (see [`Node::revoke_unissued`]).
fn revoke_unissued<S: Store>(node: &Node<S>) {
    match node.revoke_unissued(UNISSUED_GRACE) {
        Ok(0) => {}
        Ok(n) => tracing::warn!(
            "revoked {n} grant(s) stored without their audit record (never enforced)"
        ),
        Err(e) => tracing::error!("revoking grants stored without their audit record: {e}"),
    }
}

/// Records each grant entry that left the kernel with its usage (see
/// [`Node::record_usage`]) until `stop`, then what is still queued.
async fn record_usage<S: Store + 'static>(
    node: Arc<Node<S>>,
    mut ended: tokio::sync::mpsc::Receiver<crate::kernel_sync::EndedEntry>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let e = tokio::select! {
            e = ended.recv() => match e {
                Some(e) => e,
                None => return,
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let n = Arc::clone(&node);
        let _ = tokio::task::spawn_blocking(move || n.record_usage(&e)).await;
    }
    while let Ok(e) = ended.try_recv() {
        let n = Arc::clone(&node);
        let _ = tokio::task::spawn_blocking(move || n.record_usage(&e)).await;
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating the state directory {}", cfg.state_dir.display()))?;
    match &cfg.store {
        StoreConfig::Redb => {
            let store_path = cfg.state_dir.join("state.redb");
            let store = Arc::new(
                RedbStore::open(&store_path)
                    .with_context(|| format!("opening the store {}", store_path.display()))?,
            );
            serve(cfg, store).await
        }
        StoreConfig::Etcd(etcd) => {
            let opts = etcd.options()?;
            let at = etcd.endpoints.join(", ");
            let store = tokio::task::spawn_blocking(move || EtcdStore::connect(opts))
                .await
                .context("connecting to etcd")?
                .with_context(|| format!("connecting to etcd at {at}"))?;
            tracing::info!("store: etcd at {at} under {}", etcd.prefix);
            serve(cfg, Arc::new(store)).await
        }
    }
}

/// The agent over `store`, until SIGTERM or SIGINT.
async fn serve<S: Store>(cfg: Arc<Config>, store: Arc<S>) -> anyhow::Result<()> {
    if cfg
        .tls_authorities
        .first()
        .is_some_and(|a| a.trust_domains.is_empty())
    {
        tracing::warn!(
            "tls.trust_domains is empty: the tls.ca bundle may issue identities of any trust \
             domain; pin it"
        );
    }
    let tls = Arc::new(
        ReloadingConfig::new(crate::api::tls::TlsFiles {
            cert: cfg.tls_cert.clone(),
            key: cfg.tls_key.clone(),
            authorities: cfg
                .tls_authorities
                .iter()
                .map(|a| (a.ca.clone(), a.trust_domains.clone()))
                .collect(),
        })
        .context("loading the TLS files")?,
    );
    let policies = Arc::new(
        Policies::load(&cfg.policy_file, cfg.policy_schema.as_deref())
            .context("loading the policies")?,
    );
    // The audit log opens before anything is decided or enforced.
    let (audit, recovered) = AuditLog::open(AuditOptions {
        dir: cfg.audit.dir.clone(),
        key_file: cfg.audit.signing_key.clone(),
        rotate_bytes: cfg.audit.rotate_bytes,
        checkpoint_every_records: cfg.audit.checkpoint_every_records,
        checkpoint_every: cfg.audit.checkpoint_every,
        node: node_name(),
        anchor_file: cfg.state_dir.join("audit-anchor.json"),
    })
    .context("opening the audit log")?;
    let audit = Arc::new(audit);
    audit
        .record(AuditEvent::AgentStart {
            version: env!("CARGO_PKG_VERSION").into(),
            config: digest(&cfg.file),
            policies: policies.files().iter().map(|f| digest(f)).collect(),
            recovered,
        })
        .context("writing the audit log's first record")?;
    tracing::info!(
        "audit log {} (checkpoints signed by {})",
        audit.current_file().display(),
        audit.public_key()
    );

    #[cfg_attr(not(feature = "ebpf-log"), allow(unused_mut))]
    let mut gate = Gate::load(&LoadOptions {
        pin_dir: cfg.pin_dir.clone(),
        max_grants: cfg.max_grants,
    })
    .context("loading the kernel gate")?;
    #[cfg(feature = "ebpf-log")]
    gate.forward_logs()
        .context("forwarding the program's log records")?;
    let maps = GateMaps::open(&cfg.pin_dir)?;
    let sync = Arc::new(KernelSync::new(Arc::clone(&store), Arc::clone(&cfg), maps));
    // Reconcile before attaching: the kernel holds exactly the live grants of the store.
    let reconciling = std::time::Instant::now();
    let repairs = sync
        .resync()
        .context("reconciling the kernel maps with the store")?;
    tracing::info!(
        "kernel reconciled with the store in {:.3} s: {} entries written, {} deleted",
        reconciling.elapsed().as_secs_f64(),
        repairs.written,
        repairs.deleted
    );
    let attacher = Arc::new(Attacher::new(gate, cfg.interfaces.clone()));
    for (iface, mode, pin) in attacher
        .attach_all()
        .context("attaching the gate to the configured interfaces")?
    {
        tracing::info!(
            "gate attached to {iface} ({mode}), link pinned at {}",
            pin.display()
        );
    }
    remove_old_layout(&cfg)?;
    for warning in crate::coverage::node_warnings(&cfg) {
        tracing::warn!("{warning}");
    }
    {
        let sync = Arc::clone(&sync);
        let attacher = Arc::clone(&attacher);
        std::thread::Builder::new()
            .name("local-addrs".into())
            .spawn(move || {
                let result = crate::local_addrs::follow(|addrs| {
                    for iface in attacher.follow_devices() {
                        tracing::warn!(
                            "{iface} was created again: the gate is attached to it anew"
                        );
                    }
                    match sync.set_local_addrs(addrs) {
                        Ok(true) => tracing::info!("node addresses changed; services rewritten"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!("rewriting services after an address change: {e}");
                            sync.request_reconcile();
                        }
                    }
                });
                if let Err(e) = result {
                    tracing::error!(
                        "following the node's addresses stopped: {e}; services cover the addresses \
                         known until now"
                    );
                }
            })
            .context("starting the address follower")?;
    }

    let engine = Engine::new(
        Arc::clone(&store),
        Arc::clone(&cfg),
        Arc::clone(&policies),
        Arc::new(crate::model::now_ms),
    );
    let node = Arc::new(Node::new(
        engine,
        Arc::clone(&sync),
        Notifier::start(cfg.webhooks.clone()),
        Arc::clone(&audit),
    ));
    // Kernel denials onto the audit log, on their own thread (stopped and flushed at shutdown).
    let denials_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let denials = match DenialReader::open(
        &cfg.pin_dir,
        cfg.state_dir.clone(),
        Arc::clone(&audit),
        cfg.audit.denial_window,
        Arc::clone(&denials_stop),
    ) {
        Ok(reader) => Some(std::thread::spawn(move || reader.run())),
        Err(e) => {
            tracing::error!("kernel denials will not be recorded: {e}");
            None
        }
    };
    revoke_unissued(&node);
    // One watcher for the files re-read while running; held until the agent stops.
    let _file_watch = {
        let (policies, tls, audit) = (Arc::clone(&policies), Arc::clone(&tls), Arc::clone(&audit));
        FileWatch::start(vec![
            Subscriber {
                name: "the policies",
                files: policies.files(),
                check: Box::new(move || {
                    let (accepted, error) = match policies.reload_if_changed() {
                        Ok(true) => {
                            tracing::info!("policies reloaded");
                            (true, String::new())
                        }
                        Ok(false) => return,
                        Err(e) => {
                            tracing::error!(
                                "policy reload refused, the previous policies stay in force:\n{e}"
                            );
                            (false, e.to_string())
                        }
                    };
                    let files = policies.files().iter().map(|f| digest(f)).collect();
                    if let Err(e) = audit.record(AuditEvent::PolicyReload {
                        accepted,
                        files,
                        error,
                    }) {
                        tracing::error!("audit: {e}");
                    }
                }),
            },
            Subscriber {
                name: "the TLS certificates",
                files: tls.files().to_vec(),
                check: Box::new(move || {
                    tls.reload_if_changed();
                }),
            },
        ])
    };

    {
        // Held records written as soon as the log is writable again; checkpoints by time.
        let audit = Arc::clone(&audit);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(AUDIT_FLUSH_EVERY);
            loop {
                tick.tick().await;
                let a = Arc::clone(&audit);
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || a.flush()).await {
                    tracing::warn!("audit: {e}");
                }
            }
        });
    }
    if let Some(url) = cfg.audit.sink_url.clone() {
        tokio::spawn(crate::audit_sink::run(
            Arc::clone(&audit),
            crate::audit_sink::SinkOptions {
                url,
                batch_max: cfg.audit.sink_batch,
                position_file: cfg.state_dir.join("audit-sink.position"),
            },
        ));
    }
    // What the kernel counted under each grant entry that leaves it, onto the audit log and the
    // grant's record; drained at stop, before the log is sealed.
    let (usage_stop_tx, usage_stop) = tokio::sync::watch::channel(false);
    let usage = sync
        .ended_entries()
        .map(|rx| tokio::spawn(record_usage(Arc::clone(&node), rx, usage_stop)));
    // Stopped before the last usage records are drained (nothing leaves the kernel after).
    let mut writers = vec![
        tokio::spawn(Arc::clone(&sync).run()),
        tokio::spawn(Arc::clone(&sync).reconcile_loop(RECONCILE_EVERY)),
    ];
    {
        // Pruning on its own: a long pass never holds up the sweep.
        let (node, retention) = (Arc::clone(&node), cfg.store_retention);
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            loop {
                tick.tick().await;
                let n = Arc::clone(&node);
                let _ = tokio::task::spawn_blocking(move || prune(&n, retention)).await;
            }
        }));
    }
    {
        let node = Arc::clone(&node);
        writers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            // A store that is down fails every sweep: said once, and once more when it works.
            let mut failing = 0u64;
            let mut ticks = 0u64;
            loop {
                tick.tick().await;
                ticks += 1;
                if ticks.is_multiple_of(UNISSUED_EVERY) {
                    let n = Arc::clone(&node);
                    let _ = tokio::task::spawn_blocking(move || revoke_unissued(&n)).await;
                }
                let n = Arc::clone(&node);
                match tokio::task::spawn_blocking(move || n.sweep()).await {
                    Ok(Ok((g, r))) => {
                        if failing > 0 {
                            tracing::info!("sweeping works again after {failing} failed sweep(s)");
                            failing = 0;
                        }
                        if g + r > 0 {
                            tracing::info!("expired {g} grant(s) and {r} pending request(s)");
                        }
                    }
                    Ok(Err(e)) => {
                        if failing == 0 {
                            tracing::error!(
                                "sweep failed: {e}; the kernel still ends grants on time, the \
                                 store's records follow once it works"
                            );
                        }
                        failing += 1;
                    }
                    Err(e) => tracing::error!("sweep task failed: {e}"),
                }
            }
        }));
    }

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let service = JitGateServer::new(Api::new(Arc::clone(&node)).with_trust(Arc::clone(&tls)));

    // Metrics and health, on their own address; the metrics read the pinned maps through their
    // own handle.
    let metrics_maps = GateMaps::open(&cfg.pin_dir)
        .map_err(|e| tracing::error!("metrics: opening the maps: {e}; kernel figures left out"))
        .ok();
    let registry = {
        let n = Arc::clone(&node);
        crate::metrics::registry(node.metrics(), Box::new(move || n.snapshot()), metrics_maps)
    };
    let ready: crate::ops_listener::ReadinessFn = {
        let n = Arc::clone(&node);
        Box::new(move || n.readiness())
    };

    // mTLS over TCP.
    let listener = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(crate::api::accept::accept_loop(
        listener,
        Arc::clone(&tls),
        tx,
    ));

    // The node-local Unix socket.
    if let Some(dir) = cfg.unix_socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if cfg.unix_socket.exists() {
        std::fs::remove_file(&cfg.unix_socket)
            .with_context(|| format!("removing the stale socket {}", cfg.unix_socket.display()))?;
    }
    let uds = UnixListener::bind(&cfg.unix_socket)
        .with_context(|| format!("binding {}", cfg.unix_socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&cfg.unix_socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", cfg.unix_socket.display()))?;
    }

    tracing::info!(
        "serving jit.v1.JitGate on {} (mTLS) and {} (local)",
        cfg.listen,
        cfg.unix_socket.display()
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp_server = tonic::transport::Server::builder()
        .add_service(reflection.clone())
        .add_service(service.clone())
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), stopped(stop_rx.clone()));
    let uds_server = tonic::transport::Server::builder()
        .add_service(reflection)
        .add_service(service)
        .serve_with_incoming_shutdown(UnixListenerStream::new(uds), stopped(stop_rx.clone()));
    let stop_rx_ops = stop_rx;
    let mut tcp = tokio::spawn(tcp_server);
    let mut local = tokio::spawn(uds_server);
    let mut ops = tokio::spawn(crate::ops_listener::run(
        cfg.metrics_listen,
        registry,
        ready,
        stop_rx_ops,
    ));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping the API; the gate stays attached"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping the API; the gate stays attached"),
        r = &mut tcp => bail!("the mTLS server stopped: {r:?}"),
        r = &mut local => bail!("the local server stopped: {r:?}"),
        r = &mut ops => bail!("the metrics and health listener stopped: {r:?}"),
    }
    let _ = stop_tx.send(true);
    // Calls in flight finish (and write their audit records) before the log is sealed; bounded.
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = (&mut tcp).await;
        let _ = (&mut local).await;
        let _ = (&mut ops).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "calls still in flight after {SHUTDOWN_GRACE:?}; their records may follow the seal"
        );
    }
    let _ = std::fs::remove_file(&cfg.unix_socket);
    // No grant entry leaves the kernel from here on: the writers stop, a write in flight ends
    // (it holds the map lock), then the last usage records are written before the seal.
    for w in &writers {
        w.abort();
    }
    {
        let sync = Arc::clone(&sync);
        let _ = tokio::task::spawn_blocking(move || sync.quiesce()).await;
    }
    let _ = usage_stop_tx.send(true);
    if let Some(task) = usage {
        let _ = task.await;
    }
    // The last window of kernel denials, then sealed: agent.stop and a signed checkpoint.
    denials_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(t) = denials {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    if let Err(e) = audit.close() {
        tracing::error!("audit: sealing the log at shutdown: {e}");
    }
    // The gate's handles close when the process exits; the pinned links keep enforcing.
    drop(attacher);
    Ok(())
}
