//! A small tmpfs on a fresh temp dir, for tests of a full disk: the registry's data dir
//! on it fills up in milliseconds. Mounting needs root; without it [`Tmpfs::mount`]
//! returns `None` and the test says it is skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A mounted tmpfs, unmounted when dropped (lazily when something still holds a file
/// on it, e.g. a registry process that did not exit).
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. "8m"); `None` when that is not
    /// allowed (not root) or `mount` is missing.
    pub fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes zeros to a file on the tmpfs until it is full; returns the file, whose
    /// removal frees the space again.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let Ok(mut f) = std::fs::File::create(&filler) else {
            return filler;
        };
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        // What the last partial chunk left.
        while f.write_all(&[0u8; 512]).is_ok() {}
        while f.write_all(&[0u8; 1]).is_ok() {}
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}
