//! The BPF filesystem the gate pins its maps and links in.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use super::error::{DatapathError, Result};

/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the kernel's bpffs is conventionally mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Whether `path` lies on a bpffs.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid C string and `st` a writable statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[expect(
        clippy::useless_conversion,
        reason = "f_type's width differs between targets"
    )]
    Ok(i64::from(st.f_type) == BPF_FS_MAGIC)
}

/// Makes `pin_dir` exist on a bpffs. When the pin directory is under `/sys/fs/bpf` and nothing is
/// mounted there (a fresh machine or container), mounts bpffs there first, as Cilium does. Any
/// other location must already be on a bpffs.
pub fn ensure_pin_dir(pin_dir: &Path) -> Result<PathBuf> {
    if !pin_dir.is_absolute() {
        return Err(DatapathError::Invalid {
            field: "pin directory",
            reason: format!("{} is not an absolute path", pin_dir.display()),
        });
    }
    let root = Path::new(DEFAULT_BPFFS);
    if pin_dir.starts_with(root) && !is_bpffs(root).unwrap_or(false) {
        mount_bpffs(root)?;
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| DatapathError::Io {
        action: "creating",
        path: pin_dir.to_path_buf(),
        source,
    })?;
    match is_bpffs(pin_dir) {
        Ok(true) => Ok(pin_dir.to_path_buf()),
        Ok(false) => Err(DatapathError::NotBpffs {
            path: pin_dir.to_path_buf(),
            reason: format!("mount bpffs there, or use a directory under {DEFAULT_BPFFS}"),
        }),
        Err(e) => Err(DatapathError::NotBpffs {
            path: pin_dir.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

fn mount_bpffs(target: &Path) -> Result<()> {
    std::fs::create_dir_all(target).map_err(|source| DatapathError::Io {
        action: "creating",
        path: target.to_path_buf(),
        source,
    })?;
    let invalid = |e: std::ffi::NulError| DatapathError::Invalid {
        field: "bpffs mount point",
        reason: e.to_string(),
    };
    let src = CString::new("bpffs").map_err(invalid)?;
    let fstype = CString::new("bpf").map_err(invalid)?;
    let dst = CString::new(target.as_os_str().as_bytes()).map_err(invalid)?;
    // SAFETY: all pointers are valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::NotBpffs {
            path: target.to_path_buf(),
            reason: format!("mounting bpffs failed: {}", io::Error::last_os_error()),
        });
    }
    tracing::info!("mounted bpffs at {}", target.display());
    Ok(())
}
