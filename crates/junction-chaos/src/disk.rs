//! The file-system side of disk faults: a tmpfs per node (so that filling one cannot touch
//! anything else), capping it at what is in use, and copying data out before unmounting.

use std::ffi::CString;
use std::path::Path;

fn c_path(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())
}

pub fn mount_tmpfs(at: &Path, size: u64, remount: bool) -> Result<(), String> {
    let target = c_path(at)?;
    let fstype = CString::new("tmpfs").map_err(|e| e.to_string())?;
    let data = CString::new(format!("size={size}")).map_err(|e| e.to_string())?;
    let flags = if remount { libc::MS_REMOUNT } else { 0 };
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

pub fn unmount(at: &Path) {
    if let Ok(target) = c_path(at) {
        // SAFETY: valid NUL-terminated path; MNT_DETACH never blocks.
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Bytes in use on the file system holding `at`.
pub fn used_bytes(at: &Path) -> Result<u64, String> {
    let path = c_path(at)?;
    // SAFETY: statvfs fills the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok((st.f_blocks - st.f_bfree) * st.f_frsize)
}

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Flips one bit inside one stored message of one partition replica in the store of a
/// stopped node (its data directory `data_dir`), through RocksDB, so RocksDB's own block
/// checksums stay valid: what a bit flipped in memory, on the bus or by firmware looks like,
/// which only Junction's record checksum can catch. `pick` chooses the replica, the message
/// and the bit. Returns (group, offset) of the changed message.
pub fn flip_stored_bit(data_dir: &Path, pick: u64) -> Result<(u64, u64), String> {
    let store = junction_storage::Store::open(&data_dir.join("db")).map_err(|e| e.to_string())?;
    junction_raft::pointers::install(&store);
    let groups: Vec<u64> = store
        .hosted_groups()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|g| *g != junction_types::META_GROUP)
        .collect();
    let mut rng = crate::rng::SplitMix64::new(pick);
    let start = rng.below(groups.len().max(1) as u64) as usize;
    for i in 0..groups.len() {
        let group = groups[(start + i) % groups.len()];
        let stored = store
            .read_messages(group, 0, u64::MAX, 1_000, 4 << 20)
            .map_err(|e| e.to_string())?;
        let candidates: Vec<&(u64, Vec<u8>)> = stored.iter().filter(|(_, b)| b.len() > 1).collect();
        if candidates.is_empty() {
            continue;
        }
        let (offset, bytes) = candidates[rng.below(candidates.len() as u64) as usize];
        let mut bytes = bytes.clone();
        // Past the version byte: inside the checksum or the body.
        let at = 1 + rng.below(bytes.len() as u64 - 1) as usize;
        bytes[at] ^= 1 << rng.below(8);
        let mut batch = store.batch();
        batch
            .put_message(group, *offset, &bytes)
            .map_err(|e| e.to_string())?;
        store.write_sync(batch).map_err(|e| e.to_string())?;
        return Ok((group, *offset));
    }
    Err("no partition replica with stored messages on that node".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_bytes_of_a_real_file_system_and_copy_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(used_bytes(dir.path()).unwrap() > 0);
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/f"), b"x").unwrap();
        let to = dir.path().join("copy");
        copy_dir(&dir.path().join("a"), &to).unwrap();
        assert_eq!(std::fs::read(to.join("b/f")).unwrap(), b"x");
    }
}
