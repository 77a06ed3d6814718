//! Storage failures name their real cause, through the real binary: a database this
//! process cannot write is "cannot be written", not "not a Bulwark database", and `status`
//! still reads it; a full disk is "no space left", not a lock or a foreign file.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use bulwark_tests::{bulwark, bulwark_bin, run_ok};

/// A prepared database with one sealed snapshot, in a directory others may read.
fn prepared(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let legacy = dir.join("legacy.db");
    let db = dir.join("bulwark.db");
    run_ok(
        bulwark()
            .args(["generate-legacy", "--skus", "30", "--path"])
            .arg(&legacy),
    );
    run_ok(
        bulwark()
            .args(["snapshot", "--legacy"])
            .arg(&legacy)
            .arg("--db")
            .arg(&db),
    );
    db
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// `bulwark` run as an unprivileged user (root ignores file modes), or as ourselves when
/// we are not root.
fn unprivileged() -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bulwark_bin());
        c
    } else {
        bulwark()
    }
}

#[test]
fn a_read_only_database_is_named_as_such_and_status_still_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = prepared(dir.path());
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    // The directory too, so that SQLite cannot make its WAL files either.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
    let status = unprivileged()
        .args(["status", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("last snapshot: 1"), "{text}");
    let runs = unprivileged()
        .args(["runs", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(runs.status.success());
    let audit = unprivileged()
        .args(["audit", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );

    let sync = unprivileged()
        .args([
            "sync",
            "--portal-url",
            "http://127.0.0.1:9",
            "--endpoints",
            "1",
            "--db",
        ])
        .arg(&db)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&sync.stderr);
    assert!(!sync.status.success());
    assert!(err.contains("cannot be written by this process"), "{err}");
    assert!(err.contains(&db.display().to_string()), "{err}");
    assert!(!err.contains("not a Bulwark database"), "{err}");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_full_disk_is_named_as_such() {
    // A small filesystem of its own (tmpfs needs root with CAP_SYS_ADMIN, which CI has).
    let dir = tempfile::tempdir().unwrap();
    let db = prepared(dir.path());
    let small = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=400k", "tmpfs"])
        .arg(small.path())
        .output();
    match mounted {
        Ok(o) if o.status.success() => {}
        other => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must be able to mount a small tmpfs: {other:?}"
            );
            eprintln!("skipped: cannot mount a small tmpfs here ({other:?})");
            return;
        }
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.path().to_path_buf());
    let full_db = small.path().join("bulwark.db");
    std::fs::copy(&db, &full_db).unwrap();
    // Fill the rest of the filesystem.
    let _ = std::fs::write(small.path().join("fill"), vec![0u8; 1 << 20]);
    let legacy = dir.path().join("legacy.db");
    for args in [
        vec!["snapshot", "--legacy", legacy.to_str().unwrap()],
        vec![
            "sync",
            "--portal-url",
            "http://127.0.0.1:9",
            "--endpoints",
            "1",
        ],
    ] {
        let out = bulwark()
            .args(&args)
            .arg("--db")
            .arg(&full_db)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains("no space left on its disk"), "{args:?}: {err}");
        assert!(
            !err.contains("not a Bulwark database") && !err.contains("locked"),
            "{args:?}: {err}"
        );
    }
    // Reading still works.
    let status = run_ok(bulwark().args(["status", "--db"]).arg(&full_db));
    assert!(status.contains("last snapshot: 1"), "{status}");
}
