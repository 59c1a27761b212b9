//! Keeps the gate attached to the configured interfaces, also when one is deleted and created
//! again (a tun device of a VPN that restarts, `wg-quick down/up`, a recreated VM tap): the old
//! link died with the old device, so the new device is attached afresh as soon as rtnetlink says
//! it exists.

use std::{collections::BTreeMap, path::PathBuf, sync::Mutex};

use crate::{
    datapath::{DatapathError, Gate, interface_index},
    spec::AttachMode,
};

/// The gate and the device each configured interface was attached to.
pub struct Attacher {
    state: Mutex<State>,
    interfaces: Vec<(String, AttachMode)>,
}

struct State {
    gate: Gate,
    /// Interface name → index of the device the pinned link is attached to.
    attached: BTreeMap<String, u32>,
}

impl Attacher {
    /// An attacher of `gate` to `interfaces`.
    pub fn new(gate: Gate, interfaces: Vec<(String, AttachMode)>) -> Self {
        Self {
            state: Mutex::new(State {
                gate,
                attached: BTreeMap::new(),
            }),
            interfaces,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Attaches to every configured interface (swapping the program into pinned links). Fails on
    /// the first interface that cannot be attached.
    pub fn attach_all(&self) -> Result<Vec<(String, AttachMode, PathBuf)>, DatapathError> {
        let mut state = self.state();
        let State { gate, attached } = &mut *state;
        let mut out = Vec::new();
        for (iface, mode) in &self.interfaces {
            let pin = gate.attach(iface, *mode)?;
            if let Some(index) = interface_index(iface) {
                attached.insert(iface.clone(), index);
            }
            out.push((iface.clone(), *mode, pin));
        }
        Ok(out)
    }

    /// Attaches afresh to every configured interface whose device is not the one attached to
    /// (created again, or created after start). Returns the interfaces attached.
    pub fn follow_devices(&self) -> Vec<String> {
        let mut state = self.state();
        let State { gate, attached } = &mut *state;
        let mut out = Vec::new();
        for (iface, mode) in &self.interfaces {
            let Some(index) = interface_index(iface) else {
                continue;
            };
            if attached.get(iface) == Some(&index) {
                continue;
            }
            tracing::debug!("{iface} is device {index} now; attaching");
            match gate.reattach(iface, *mode) {
                Ok(_) => {
                    attached.insert(iface.clone(), index);
                    out.push(iface.clone());
                }
                Err(e) => tracing::error!("attaching the gate to {iface} again ({mode}): {e}"),
            }
        }
        out
    }
}
