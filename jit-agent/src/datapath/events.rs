//! The event ring buffer: deny and audit events, and the first packet allowed under a grant.

use std::path::Path;

use aya::maps::{Map, MapData, RingBuf};
use jit_common::{Event, map_names};

use super::error::{DatapathError, Result};

/// Reads events from the pinned ring buffer. The kernel writes events against a per-CPU budget
/// that the reader renews every second ([`super::GateMaps::refill_event_tokens`]); what was left
/// out is counted (`events_rate_limited`).
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    /// Opens the ring buffer pinned under `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let path = super::maps_dir(pin_dir).join(map_names::EVENTS);
        if !path.exists() {
            return Err(DatapathError::NotLoaded {
                pin_dir: pin_dir.to_path_buf(),
                map: map_names::EVENTS,
            });
        }
        let map_err = |source| DatapathError::Map {
            map: map_names::EVENTS,
            source,
        };
        let data = MapData::from_pin(&path).map_err(map_err)?;
        let ring =
            RingBuf::try_from(Map::from_map_data(data).map_err(map_err)?).map_err(map_err)?;
        Ok(Self { ring })
    }

    /// The next event, if one is waiting. Records of the wrong size (which the kernel program
    /// never writes) are skipped.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let item = self.ring.next()?;
            if item.len() == size_of::<Event>() {
                // SAFETY: `Event` is plain old data of exactly this size; read_unaligned because
                // the ring buffer only promises 8-byte alignment.
                return Some(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
    }

    /// Takes every waiting event.
    pub fn drain(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.next_event()).collect()
    }
}

impl std::os::fd::AsFd for EventReader {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.ring.as_fd()
    }
}
