//! Operator holds on subjects ([`crate::Store::hold`]): a durable pause that every worker
//! on the database honours. A held subject's workflows stay queued, exactly as they are:
//! claims skip them, and one already in flight stops before its next command and gives its
//! lease back. Nothing is journaled for it, so no retry is used, no failure counted and no
//! circuit moved; lifting the hold lets the next claim take the workflow up where it was.
//!
//! Workers learn of holds from the store: at every claim (the claim itself excludes held
//! subjects) and, while they drive workflows, every [`REFRESH`] at most.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::store::{AlertLevel, NewAlert};

/// How often a worker driving workflows reads the holds again (at most; a third of its
/// lease when that is shorter).
pub const REFRESH: Duration = Duration::from_secs(1);

/// The alert recorded when `subject` is held.
pub fn held_alert(subject: &str, reason: &str, by: &str) -> NewAlert {
    NewAlert {
        kind: "hold".into(),
        level: AlertLevel::Warn,
        subject: subject.to_string(),
        message: format!(
            "{subject} held by {by}: {reason}; its work waits, untouched, until the hold is lifted"
        ),
    }
}

/// The alert recorded when the hold on `subject` is lifted.
pub fn lifted_alert(subject: &str, by: &str) -> NewAlert {
    NewAlert {
        kind: "hold_lifted".into(),
        level: AlertLevel::Warn,
        subject: subject.to_string(),
        message: format!("hold on {subject} lifted by {by}; its work goes on"),
    }
}

/// A worker's view of the held subjects, shared by its workflow tasks: checked before
/// every command, so it costs one atomic load while nothing is held.
#[derive(Debug, Clone, Default)]
pub struct HeldSubjects {
    any: Arc<AtomicBool>,
    subjects: Arc<RwLock<HashSet<String>>>,
}

impl HeldSubjects {
    /// Replace the view with `subjects`.
    pub fn set(&self, subjects: impl IntoIterator<Item = String>) {
        let subjects: HashSet<String> = subjects.into_iter().collect();
        self.any.store(!subjects.is_empty(), Ordering::Release);
        *self.subjects.write().expect("holds") = subjects;
    }

    /// Forget `subjects`: a claim just found them not held (it excludes held subjects), so
    /// a view older than the claim must not stop them (a hold lifted since the last read).
    pub fn not_held<'a>(&self, subjects: impl IntoIterator<Item = &'a str>) {
        if !self.any.load(Ordering::Acquire) {
            return;
        }
        let mut set = self.subjects.write().expect("holds");
        for s in subjects {
            set.remove(s);
        }
        self.any.store(!set.is_empty(), Ordering::Release);
    }

    /// Is `subject` held?
    pub fn contains(&self, subject: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.subjects.read().expect("holds").contains(subject)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_follows_the_last_set() {
        let h = HeldSubjects::default();
        assert!(!h.contains("a"));
        h.set(["a".to_string(), "b".to_string()]);
        assert!(h.contains("a") && h.contains("b") && !h.contains("c"));
        h.not_held(["a"]);
        assert!(!h.contains("a") && h.contains("b"));
        let clone = h.clone();
        h.set(Vec::new());
        assert!(!clone.contains("b"), "clones share the view");
    }
}
