//! The kernel gate from userspace: load and pin the program, attach and detach it, and read and
//! write its maps through the `jit-common` types.
//!
//! Ownership: this module writes the maps and never decides what should be in them.

mod bpffs;
mod clock;
mod error;
mod events;
mod loader;
mod maps;

pub use bpffs::{DEFAULT_BPFFS, ensure_pin_dir, is_bpffs};
pub use clock::{boottime_after, boottime_ns};
pub use error::{DatapathError, Result};
pub use events::EventReader;
pub use loader::{
    Attachment, DEFAULT_PIN_DIR, DeviceKind, Gate, LoadOptions, attachments, auto_hooks,
    auto_hooks_of, check_interface, detach, device_kind, harness, interface_index, link_pin_path,
    load_harness, remove_stale_layouts,
};
pub use maps::{
    Counters, GateMaps, GrantEntry, GrantScope, MapFill, ServiceEntry, Usage, grant_key, maps_dir,
};
