//! Leftover browsers of a killed process. chromedriver (and the Chromium it starts) run
//! in a process group of their own, so a signal to Bulwark's group does not tear them
//! down mid-step, and Bulwark holds an exclusive lock (flock) on a file named after that
//! group for as long as it lives: `$TMPDIR/bulwark-webdriver-<uid>/<pgid>.lock`, holding
//! the group leader's start time. The kernel drops the lock when Bulwark dies, however it
//! dies (`kill -9` included); the next start finds the file unlocked, checks that the
//! group leader is still that same chromedriver (same start time: a recycled process id
//! is left alone) and kills the group. A normal exit kills chromedriver and removes the
//! file itself.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::PathBuf;

/// The lock of one chromedriver group; dropping it removes the file.
#[derive(Debug)]
pub(crate) struct GroupLock {
    _file: File,
    path: PathBuf,
}

impl Drop for GroupLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// This user's private directory of group locks.
fn dir() -> io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let uid = fs::metadata("/proc/self")?.uid();
    let d = std::env::temp_dir().join(format!("bulwark-webdriver-{uid}"));
    match fs::DirBuilder::new().mode(0o700).create(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(&d)?;
    if !meta.is_dir() || meta.permissions().mode() & 0o077 != 0 || meta.uid() != uid {
        return Err(io::Error::other(format!(
            "{} is not a private directory of this user",
            d.display()
        )));
    }
    Ok(d)
}

/// The start time (clock ticks since boot) of process `pid`, from `/proc/<pid>/stat`.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Record the group led by `pgid` (a chromedriver this process started) as ours.
pub(crate) fn register(pgid: u32) -> io::Result<GroupLock> {
    let path = dir()?.join(format!("{pgid}.lock"));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    file.try_lock()
        .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
    let started = start_time(pgid).unwrap_or(0);
    write!(file, "{pgid} {started}")?;
    file.flush()?;
    Ok(GroupLock { _file: file, path })
}

/// Kill the chromedriver groups whose owner died; returns how many were killed.
pub(crate) fn reap_leftovers() -> usize {
    let Ok(d) = dir() else { return 0 };
    let Ok(entries) = fs::read_dir(&d) else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "lock") {
            continue;
        }
        let Ok(mut file) = OpenOptions::new().read(true).write(true).open(&path) else {
            continue;
        };
        // Locked: its owner is alive (this process or another Bulwark).
        if file.try_lock().is_err() {
            continue;
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let mut parts = text.split_whitespace().map(str::parse::<u64>);
        if let (Some(Ok(pgid)), Some(Ok(started))) = (parts.next(), parts.next())
            && let Ok(pgid) = u32::try_from(pgid)
            && started != 0
            && start_time(pgid) == Some(started)
            && let Some(pid) = rustix::process::Pid::from_raw(pgid as i32)
        {
            match rustix::process::kill_process_group(pid, rustix::process::Signal::KILL) {
                Ok(()) => {
                    killed += 1;
                    tracing::warn!(
                        pgid,
                        "killed chromedriver and Chromium left by a process that died"
                    );
                }
                Err(e) => {
                    tracing::warn!(pgid, error = %e, "could not kill a leftover chromedriver group")
                }
            }
        }
        let _ = fs::remove_file(&path);
    }
    killed
}
