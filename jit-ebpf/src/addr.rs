//! Addresses as two 64-bit words, and the map keys and events built from them.
//!
//! The BPF backend turns a zeroed `[u8; 16]` into a call to a byte-by-byte `memset`, and copies
//! byte arrays one byte at a time. Here an address is two `u64` (bytes 0..8 and 8..16 in memory
//! order), read from the packet with two loads and written into keys and events with two stores
//! at 8-byte aligned offsets (the shared key types put addresses there), which the verifier
//! accepts on the stack. The stores are volatile so LLVM cannot merge them into wider stores
//! at misaligned offsets (the program is built with misaligned access allowed, for packet loads,
//! and the verifier refuses a misaligned store to the stack).

// Keys are built from native-endian words of their memory image (`jit-ebpf/src/addr.rs` shifts
// bytes into place assuming little-endian); the agent and the kernel must agree.
#[cfg(target_endian = "big")]
compile_error!(
    "JIT Gate's map keys assume a little-endian machine (x86-64, aarch64 little-endian)"
);

use core::mem::MaybeUninit;

use jit_common::{Event, FAMILY_V4, GRANT_KIND_HOST, GRANT_KIND_IDENTITY, GrantKey, ServiceKey};

/// A 16-byte address as two native-endian words of its memory image.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Words {
    pub(crate) hi: u64,
    pub(crate) lo: u64,
}

impl Words {
    pub(crate) const ZERO: Self = Self { hi: 0, lo: 0 };

    /// An IPv4 address (its 4 bytes as loaded from the packet) in the service-key form: the
    /// address in the first 4 bytes, the rest zero.
    #[inline(always)]
    pub(crate) const fn v4(addr: u32) -> Self {
        Self {
            hi: addr as u64,
            lo: 0,
        }
    }

    /// An IPv4 address in the IPv4-mapped form of grant keys and the identity trie
    /// (`::ffff:a.b.c.d`).
    #[inline(always)]
    pub(crate) const fn v4_mapped(addr: u32) -> Self {
        Self {
            hi: 0,
            lo: ((addr as u64) << 32) | u64::from_ne_bytes([0, 0, 0xff, 0xff, 0, 0, 0, 0]),
        }
    }

    /// The address of `bytes`.
    #[inline(always)]
    pub(crate) const fn from_bytes(b: [u8; 16]) -> Self {
        Self {
            hi: u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
            lo: u64::from_ne_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    /// The first byte of the address.
    #[inline(always)]
    pub(crate) const fn first_byte(&self) -> u8 {
        self.hi.to_ne_bytes()[0]
    }

    /// The first 4 bytes as loaded from the packet.
    #[inline(always)]
    pub(crate) const fn first_u32(&self) -> u32 {
        self.hi as u32
    }

    /// Writes the address into 16 bytes at an 8-byte aligned place.
    #[inline(always)]
    fn store(self, dst: *mut [u8; 16]) {
        let p = dst.cast::<u64>();
        // SAFETY: `dst` is valid for 16 bytes and 8-byte aligned (every caller passes a field at
        // an aligned offset of an `align(8)` type).
        unsafe {
            p.write_volatile(self.hi);
            p.add(1).write_volatile(self.lo);
        }
    }
}

/// A services-map key.
#[inline(always)]
pub(crate) fn service_key(family: u8, proto: u8, port: u16, addr: Words) -> ServiceKey {
    let mut k = MaybeUninit::<ServiceKey>::uninit();
    let p = k.as_mut_ptr();
    // SAFETY: every field is written before `assume_init`; the address is at offset 8 of an
    // 8-byte aligned struct.
    unsafe {
        (&raw mut (*p).family).write_volatile(family);
        (&raw mut (*p).proto).write_volatile(proto);
        (&raw mut (*p).port).write_volatile(port);
        (&raw mut (*p)._pad).write_volatile(0);
        addr.store(&raw mut (*p).addr);
        k.assume_init()
    }
}

/// A grants-map key.
#[inline(always)]
fn grant_key(service_id: u32, kind: u32, source: Words) -> GrantKey {
    let mut k = MaybeUninit::<GrantKey>::uninit();
    let p = k.as_mut_ptr();
    // SAFETY: as in `service_key`.
    unsafe {
        (&raw mut (*p).service_id).write_volatile(service_id);
        (&raw mut (*p).kind).write_volatile(kind);
        source.store(&raw mut (*p).source);
        k.assume_init()
    }
}

/// The key of a grant bound to the source address `source` (IPv4-mapped form).
#[inline(always)]
pub(crate) fn host_grant_key(service_id: u32, source: Words) -> GrantKey {
    grant_key(service_id, GRANT_KIND_HOST, source)
}

/// The key of an identity's grant.
#[inline(always)]
pub(crate) fn identity_grant_key(service_id: u32, identity_id: u32) -> GrantKey {
    grant_key(
        service_id,
        GRANT_KIND_IDENTITY,
        Words {
            hi: u64::from(identity_id),
            lo: 0,
        },
    )
}

/// What an event says besides its addresses.
pub(crate) struct EventHead {
    pub(crate) timestamp_ns: u64,
    pub(crate) grant_id: u64,
    pub(crate) kind: u32,
    pub(crate) reason: u32,
    pub(crate) identity_id: u32,
    pub(crate) service_id: u32,
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    pub(crate) family: u8,
    pub(crate) proto: u8,
}

/// An event; `src` in the IPv4-mapped form (events carry IPv4 in the first 4 bytes), `dst` in
/// the service-key form.
#[inline(always)]
pub(crate) fn event(h: &EventHead, src: Words, dst: Words) -> Event {
    let src = if h.family == FAMILY_V4 {
        Words::v4((src.lo >> 32) as u32)
    } else {
        src
    };
    let mut e = MaybeUninit::<Event>::uninit();
    let p = e.as_mut_ptr();
    // SAFETY: every field is written before `assume_init`; the addresses are at offsets 40 and
    // 56 of an 8-byte aligned struct.
    unsafe {
        (&raw mut (*p).timestamp_ns).write_volatile(h.timestamp_ns);
        (&raw mut (*p).grant_id).write_volatile(h.grant_id);
        (&raw mut (*p).kind).write_volatile(h.kind);
        (&raw mut (*p).reason).write_volatile(h.reason);
        (&raw mut (*p).identity_id).write_volatile(h.identity_id);
        (&raw mut (*p).service_id).write_volatile(h.service_id);
        (&raw mut (*p).src_port).write_volatile(h.src_port);
        (&raw mut (*p).dst_port).write_volatile(h.dst_port);
        (&raw mut (*p).family).write_volatile(h.family);
        (&raw mut (*p).proto).write_volatile(h.proto);
        (&raw mut (*p)._pad).write_volatile(0);
        src.store(&raw mut (*p).src_addr);
        dst.store(&raw mut (*p).dst_addr);
        e.assume_init()
    }
}

/// A key of the identity trie, 8-byte aligned so it can be written with aligned stores (aya's
/// `Key` is packed: its address starts at offset 4).
#[repr(C, align(8))]
pub(crate) struct TrieKey(pub(crate) aya_ebpf::maps::lpm_trie::Key<[u8; 16]>);

/// The full-length trie key of a source address (IPv4-mapped form).
#[inline(always)]
pub(crate) fn trie_key(source: Words) -> TrieKey {
    let mut k = MaybeUninit::<TrieKey>::uninit();
    let p = k.as_mut_ptr().cast::<u8>();
    // Bytes 0..4 prefix length, 4..20 the address: written as 8 + 8 + 4 bytes at aligned offsets.
    let w0 = 128u64 | ((source.hi & 0xffff_ffff) << 32);
    let w1 = (source.hi >> 32) | ((source.lo & 0xffff_ffff) << 32);
    let w2 = (source.lo >> 32) as u32;
    // SAFETY: the 20 bytes of the key are written before `assume_init`; offsets 0, 8 and 16 of
    // an 8-byte aligned value.
    unsafe {
        p.cast::<u64>().write_volatile(w0);
        p.add(8).cast::<u64>().write_volatile(w1);
        p.add(16).cast::<u32>().write_volatile(w2);
        k.assume_init()
    }
}
