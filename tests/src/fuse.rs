//! Mount points: whether FUSE is here, whether a directory is mounted (stale or not),
//! and detaching what a killed mount process left behind.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Whether FUSE can be used here; says so loudly when not.
pub fn fuse_available(test: &str) -> bool {
    if Path::new("/dev/fuse").exists() {
        return true;
    }
    eprintln!("\n!!! SKIPPED {test}: /dev/fuse is missing, so no FUSE mount can be tested here !!!\n");
    false
}

/// Whether `dir` is a mount point (per /proc/self/mountinfo), stale or not.
pub fn is_mounted(dir: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.as_os_str().as_bytes();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|p| unescape(p) == want))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// Lazily detaches whatever is mounted at `dir`.
pub fn detach(dir: &Path) {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else { return };
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Whether statfs(2) on `dir` succeeds: a mount that is served (a stat can be answered
/// from cached attributes even when the mount is stale).
pub fn statfs_ok(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: plain data, filled in by statfs(2).
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a valid out pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut buf) == 0 }
}
