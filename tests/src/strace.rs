//! strace attached to a running relay, for promises about its system calls that no test can
//! check from outside: that a file is synced before an answer that says it is on disk (only
//! a power cut would show the difference).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::{PATIENCE, wait_until};

/// strace attached to every thread of a process (and those it starts), recording the system
/// calls given, one per line: `TID call(args) = result`, each descriptor followed by the file
/// or socket it is (`-y`), buffers up to 4096 bytes with escapes such as `\r\n`.
#[derive(Debug)]
pub struct Strace {
    child: Child,
    path: PathBuf,
}

impl Strace {
    /// Attaches to `pid`, tracing the comma-separated `calls`; the record goes to `dir`. Then
    /// runs `poke` until a traced call shows, since strace prints nothing before it has
    /// attached to every thread. Needs root (or `CAP_SYS_PTRACE`).
    pub fn attach(pid: u32, calls: &str, dir: &Path, mut poke: impl FnMut()) -> Strace {
        let path = dir.join("strace.out");
        let mut child = Command::new("strace")
            .args(["-f", "-y", "-qq", "-s", "4096", "-e", &format!("trace={calls}"), "-o"])
            .arg(&path)
            .args(["-p", &pid.to_string()])
            .stderr(Stdio::piped())
            .spawn()
            .expect("strace (scripts/setup.sh installs it)");
        let strace_path = path.clone();
        let traced = move || std::fs::metadata(&strace_path).is_ok_and(|m| m.len() > 0);
        if !wait_until(PATIENCE, || {
            poke();
            traced()
        }) {
            let _ = child.kill();
            let stderr = child.wait_with_output().map(|o| String::from_utf8_lossy(&o.stderr).into_owned());
            panic!("strace recorded nothing: {stderr:?}");
        }
        Strace { child, path }
    }

    /// The lines recorded so far (the last may be cut short).
    pub fn record(&self) -> Vec<String> {
        std::fs::read_to_string(&self.path).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// Detaches and returns the lines recorded. The traced thread waits while strace writes
    /// each line, so a call that returned before an answer was sent is recorded before it.
    pub fn finish(mut self) -> Vec<String> {
        // SIGINT: strace detaches from the process and exits.
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.path).expect("strace's record").lines().map(str::to_string).collect()
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The thread that made the call on a line of the record.
pub fn thread(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or_default()
}
