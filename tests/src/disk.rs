//! A disk that hangs on demand: a small ext4 filesystem on a loop device that a test freezes
//! with `fsfreeze`. While frozen, every write and sync to it blocks in the kernel (the
//! writer sleeps uninterruptibly, as behind a stuck disk controller or a lost network block
//! device), and nothing fails, until it is thawed. It can also be filled to the last block
//! ([`FreezableDisk::take_all_room`]), so that writes fail with `ENOSPC` as on a real full
//! disk. Needs root, as the README's test command runs; a missing tool or permission fails
//! the test with the command's error. [`ThinDisk`] fails under its filesystem instead:
//! storage that runs out below it, so that writes fail with `EIO` and ext4 turns read-only.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// How long a freeze lasts at most, even if the test process is killed before it thaws: a
/// process blocked on a frozen filesystem cannot be killed, so a forgotten freeze would
/// leave the relay, and whatever cleans up after the test, hanging.
const MAX_FREEZE_SECS: u32 = 120;

/// A mounted filesystem that can be frozen. Dropping it unmounts it; drop every process
/// using it first (declare it before them).
#[derive(Debug)]
pub struct FreezableDisk {
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl FreezableDisk {
    /// Makes and mounts a filesystem of `mib` MiB.
    pub fn create(mib: u64) -> FreezableDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let (image, mount) = (dir.path().join("image"), dir.path().join("mnt"));
        std::fs::File::create(&image).and_then(|f| f.set_len(mib << 20)).expect("image file");
        std::fs::create_dir(&mount).expect("mount point");
        run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), image.as_os_str()]);
        // `-o loop` sets the loop device to free itself once the filesystem is unmounted.
        run("mount", &["-o".as_ref(), "loop".as_ref(), image.as_os_str(), mount.as_os_str()]);
        FreezableDisk { mount, _dir: dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Writes zeros to a file `ballast` on it until the filesystem has no room left
    /// (`ENOSPC`); returns the file's path, to remove for room again.
    pub fn take_all_room(&self) -> PathBuf {
        fill_with_ballast(&self.mount)
    }

    /// From now on, writes and syncs block until the returned guard is dropped. Declared
    /// after the processes using the disk, the guard thaws it before they are killed, also
    /// when a test fails: a process blocked on a frozen filesystem cannot be killed.
    pub fn freeze(&self) -> Frozen {
        let script = format!("sleep {MAX_FREEZE_SECS}; exec fsfreeze -u \"$0\"");
        let thaw_later = Command::new("sh")
            .args(["-c".as_ref(), script.as_ref(), self.mount.as_os_str()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the thaw of last resort");
        run("fsfreeze", &["-f".as_ref(), self.mount.as_os_str()]);
        Frozen { mount: self.mount.clone(), thaw_later }
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        // Lazy: whatever still has a file open there keeps it until it closes it.
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

/// A frozen [`FreezableDisk`]; dropping this thaws it, and blocked writes and syncs go on.
#[derive(Debug)]
pub struct Frozen {
    mount: PathBuf,
    /// Thaws the filesystem after [`MAX_FREEZE_SECS`] unless killed first.
    thaw_later: Child,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let thawed = Command::new("fsfreeze").arg("-u").arg(&self.mount).status();
        let _ = self.thaw_later.kill();
        let _ = self.thaw_later.wait();
        // Not a panic while panicking; the thaw of last resort has been stopped, so say so.
        if !thawed.is_ok_and(|s| s.success()) && !std::thread::panicking() {
            panic!("fsfreeze -u {} failed", self.mount.display());
        }
    }
}

/// An ext4 filesystem whose storage runs out underneath it, as thin-provisioned storage can:
/// its image is a sparse file on a small tmpfs. Once [`ThinDisk::exhaust`] fills the tmpfs,
/// a write to a block the image never had fails below the filesystem: ext4 sees `EIO`,
/// aborts its journal and turns read-only. [`ThinDisk::repair`] then does what an operator
/// would: room back, `e2fsck`, and the filesystem mounted again. Needs root, as
/// [`FreezableDisk`] does.
#[derive(Debug)]
pub struct ThinDisk {
    backing: PathBuf,
    image: PathBuf,
    mount: PathBuf,
    _dir: tempfile::TempDir,
}

impl ThinDisk {
    /// A filesystem of `mib` MiB on `backing_mib` MiB of storage.
    pub fn create(mib: u64, backing_mib: u64) -> ThinDisk {
        let dir = tempfile::tempdir().expect("tempdir");
        let (backing, mount) = (dir.path().join("storage"), dir.path().join("mnt"));
        std::fs::create_dir(&backing).and_then(|()| std::fs::create_dir(&mount)).expect("mount points");
        let size = format!("size={backing_mib}m");
        run("mount", &["-t".as_ref(), "tmpfs".as_ref(), "-o".as_ref(), size.as_ref(), "tmpfs".as_ref(), backing.as_os_str()]);
        let image = backing.join("image");
        std::fs::File::create(&image).and_then(|f| f.set_len(mib << 20)).expect("sparse image");
        run("mkfs.ext4", &["-q".as_ref(), "-F".as_ref(), image.as_os_str()]);
        let disk = ThinDisk { backing, image, mount, _dir: dir };
        disk.mount();
        disk
    }

    fn mount(&self) {
        run("mount", &["-o".as_ref(), "loop".as_ref(), self.image.as_os_str(), self.mount.as_os_str()]);
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Takes the rest of the storage, so that writes to new blocks of the filesystem fail.
    pub fn exhaust(&self) {
        fill_with_ballast(&self.backing);
    }

    /// Gives the storage back, checks the filesystem and mounts it again. Stop every process
    /// using it first.
    pub fn repair(&self) {
        std::fs::remove_file(self.backing.join("ballast")).expect("remove the ballast");
        run("umount", &[self.mount.as_os_str()]);
        // 0: clean, 1: errors corrected (the journal ext4 aborted).
        let checked = Command::new("e2fsck").arg("-fy").arg(&self.image).output().expect("e2fsck (install e2fsprogs)");
        assert!(matches!(checked.status.code(), Some(0 | 1)), "e2fsck: {}", String::from_utf8_lossy(&checked.stdout));
        self.mount();
    }
}

impl Drop for ThinDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = Command::new("umount").arg("-l").arg(&self.backing).status();
    }
}

/// Writes (and syncs) zeros to a file `ballast` in `dir` until its filesystem has no room
/// left (`ENOSPC`); returns the file's path.
fn fill_with_ballast(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast");
    let mut file = std::fs::File::create(&path).expect("ballast");
    let chunk = vec![0u8; 1 << 20];
    let full = loop {
        if let Err(e) = file.write_all(&chunk).and_then(|()| file.sync_data()) {
            break e;
        }
    };
    assert_eq!(full.raw_os_error(), Some(28), "not ENOSPC: {full}");
    path
}

fn run(program: &str, args: &[&std::ffi::OsStr]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (install e2fsprogs, mount and util-linux; run as root)"));
    assert!(out.status.success(), "{program} {args:?} failed (run as root): {}", String::from_utf8_lossy(&out.stderr));
}
