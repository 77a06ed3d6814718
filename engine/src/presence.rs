//! Which lease owners on this host are gone: a process that holds leases also holds an
//! exclusive lock on a small file named after it, and the kernel drops that lock when the
//! process dies however it dies (kill -9, OOM, a panic). A worker that can take such a
//! lock knows its owner is dead and may claim its leases at once instead of waiting for
//! them to run out.
//!
//! ```text
//! $TMPDIR/bulwark-presence/<scope>/<owner>.lock   held (flock) for the owner's life
//!                                  <owner>.dead   written by whoever found it unlocked
//! ```
//!
//! `scope` identifies the database (a hash of host, port, database and schema), so
//! processes of unrelated databases never look at each other. Only the same host (the
//! same temporary directory) is covered: a worker on another machine, or in a container
//! with its own `/tmp`, still waits for the lease to end. A stopped process (SIGSTOP, a
//! frozen VM) keeps its lock: it is alive, and its leases run out as usual — the effect
//! fence ([`crate::fence`]) keeps it from sending anything once it resumes.
//!
//! The directory is created private to the user (0700) and ignored if it is not: a
//! `.dead` marker is taken at its word, so nobody else may be able to write one.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

/// How long a `.dead` marker is honoured: longer than any lease.
const DEAD_FOR: Duration = Duration::from_secs(3600);

/// This process's presence: the held lock file, removed again on drop (a graceful stop).
#[derive(Debug)]
pub struct Presence {
    dir: PathBuf,
    owner: String,
    path: PathBuf,
    lock: Option<File>,
}

/// A stable 64-bit FNV-1a hash (the same in every build, unlike `DefaultHasher`).
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A file name for `owner`: safe characters kept, the rest hex-escaped.
fn file_stem(owner: &str) -> String {
    owner
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

fn read_owner(path: &Path) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    (!s.is_empty()).then_some(s)
}

/// The private directory of `scope` under `base`, created if missing.
fn private_dir(base: &Path, scope: &str) -> io::Result<PathBuf> {
    let root = base.join("bulwark-presence");
    let dir = root.join(format!("{:016x}", stable_hash(scope)));
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        for d in [&root, &dir] {
            match fs::DirBuilder::new().mode(0o700).create(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            let meta = fs::symlink_metadata(d)?;
            let mine = fs::metadata("/proc/self").map(|m| m.uid()).ok();
            if !meta.is_dir()
                || meta.permissions().mode() & 0o077 != 0
                || mine.is_some_and(|uid| uid != meta.uid())
            {
                return Err(io::Error::other(format!(
                    "{} is not a private directory of this user",
                    d.display()
                )));
            }
        }
        Ok(dir)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Err(io::Error::other("presence files need a Unix host"))
    }
}

impl Presence {
    /// Announce `owner` in `scope` (under the system's temporary directory).
    pub fn register(scope: &str, owner: &str) -> io::Result<Presence> {
        Self::register_in(&std::env::temp_dir(), scope, owner)
    }

    /// This process's presence as `owner` in `scope`, shared by every runtime of the
    /// process that uses the same name (registered by the first).
    pub fn shared(scope: &str, owner: &str) -> io::Result<Arc<Presence>> {
        type Registry = HashMap<(String, String), Weak<Presence>>;
        static SHARED: Mutex<Option<Registry>> = Mutex::new(None);
        let mut map = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        let map = map.get_or_insert_with(HashMap::new);
        map.retain(|_, p| p.strong_count() > 0);
        let key = (scope.to_string(), owner.to_string());
        if let Some(p) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(p);
        }
        let p = Arc::new(Self::register(scope, owner)?);
        map.insert(key, Arc::downgrade(&p));
        Ok(p)
    }

    /// Announce `owner` in `scope` under `base`.
    pub fn register_in(base: &Path, scope: &str, owner: &str) -> io::Result<Presence> {
        let dir = private_dir(base, scope)?;
        let stem = file_stem(owner);
        let path = dir.join(format!("{stem}.lock"));
        // Written and locked under a temporary name, then renamed into place: nobody sees
        // the file unlocked and takes this process for dead.
        let tmp = dir.join(format!(".{stem}.{}.tmp", std::process::id()));
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .open(&tmp)?;
        if let Err(e) = file.try_lock() {
            let _ = fs::remove_file(&tmp);
            return Err(io::Error::other(format!(
                "cannot lock {}: {e}",
                tmp.display()
            )));
        }
        file.write_all(owner.as_bytes())?;
        file.flush()?;
        if let Ok(existing) = OpenOptions::new().read(true).write(true).open(&path)
            && existing.try_lock().is_err()
        {
            // Another live process of this host uses the same owner name.
            let _ = fs::remove_file(&tmp);
            return Err(io::Error::other(format!(
                "another process on this host is already lease owner {owner:?}"
            )));
        }
        fs::rename(&tmp, &path)?;
        let _ = fs::remove_file(dir.join(format!("{stem}.dead")));
        Ok(Presence {
            dir,
            owner: owner.to_string(),
            path,
            lock: Some(file),
        })
    }

    /// The owner this presence announces.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Owners of this scope whose process is gone (never this one): each lock file
    /// nobody holds becomes a `.dead` marker, honoured for an hour.
    pub fn dead(&self) -> Vec<String> {
        let mut dead = Vec::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return dead;
        };
        let now = SystemTime::now();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if path == self.path || name.starts_with('.') {
                continue;
            }
            if let Some(stem) = name.strip_suffix(".lock") {
                let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
                    continue;
                };
                if file.try_lock().is_err() {
                    continue; // alive (or being checked by another process right now)
                }
                let Some(owner) = read_owner(&path) else {
                    let _ = fs::remove_file(&path);
                    continue;
                };
                let marker = self.dir.join(format!("{stem}.dead"));
                if fs::write(&marker, owner.as_bytes()).is_ok() {
                    let _ = fs::remove_file(&path);
                }
                if owner != self.owner {
                    dead.push(owner);
                }
            } else if name.ends_with(".dead") {
                let age = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                if age > DEAD_FOR {
                    let _ = fs::remove_file(&path);
                } else if let Some(owner) = read_owner(&path)
                    && owner != self.owner
                {
                    dead.push(owner);
                }
            }
        }
        dead.sort();
        dead.dedup();
        dead
    }
}

impl Presence {
    /// What the kernel does when the process dies: the lock goes, the file stays.
    #[cfg(test)]
    fn die(mut self) -> PathBuf {
        drop(self.lock.take());
        std::mem::take(&mut self.path)
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        if self.lock.is_none() {
            return;
        }
        // A graceful stop released its leases: nothing to announce.
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_lock_is_found_dead_and_a_held_one_is_not() {
        let base = tempfile::tempdir().unwrap();
        let me = Presence::register_in(base.path(), "db-1", "host-1").unwrap();
        let alive = Presence::register_in(base.path(), "db-1", "host-2").unwrap();
        let other_db = Presence::register_in(base.path(), "db-2", "host-3").unwrap();
        assert_eq!(me.dead(), Vec::<String>::new());
        // A process that dies leaves its file, unlocked.
        let path = Presence::register_in(base.path(), "db-1", "host 4/x")
            .unwrap()
            .die();
        assert!(path.exists());
        assert_eq!(me.dead(), vec!["host 4/x".to_string()]);
        // Found once, still known dead at the next look (a marker), by anyone.
        assert_eq!(alive.dead(), vec!["host 4/x".to_string()]);
        assert!(other_db.dead().is_empty());
        // The same name registering again is alive again.
        let back = Presence::register_in(base.path(), "db-1", "host 4/x").unwrap();
        assert!(me.dead().is_empty());
        assert!(Presence::register_in(base.path(), "db-1", "host 4/x").is_err());
        drop(back);
        drop(alive);
        assert!(me.dead().is_empty(), "a graceful stop is not a death");
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("bulwark-presence");
        fs::create_dir(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let e = Presence::register_in(base.path(), "db", "w").unwrap_err();
        assert!(e.to_string().contains("not a private directory"), "{e}");
    }
}
