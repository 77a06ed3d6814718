//! Secret lookup and redaction.
//!
//! Profiles and endpoint settings never hold secret values: an endpoint names, in its
//! settings, the environment variable that holds each secret (`<name>_env`). The adapter
//! resolves them through a [`Secrets`] implementation ([`EnvSecrets`] by default, a
//! [`MapSecrets`] in tests) and scrubs every resolved value, and every token obtained
//! from a login, out of whatever text leaves it (errors, logs, response excerpts).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

/// Where secret values come from, by variable name.
pub trait Secrets: Send + Sync {
    /// The value of `name`, if set and non-empty.
    fn get(&self, name: &str) -> Option<String>;
}

/// Reads secrets from the process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnvSecrets;

impl Secrets for EnvSecrets {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// An in-memory map of secrets (for tests and embedding programs). `Debug` never shows
/// the values.
#[derive(Clone, Default)]
pub struct MapSecrets {
    values: HashMap<String, String>,
}

impl MapSecrets {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) `name` = `value`.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.values.insert(name.into(), value.into());
        self
    }
}

impl fmt::Debug for MapSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.values.keys().collect();
        names.sort();
        f.debug_struct("MapSecrets")
            .field("names", &names)
            .finish_non_exhaustive()
    }
}

impl Secrets for MapSecrets {
    fn get(&self, name: &str) -> Option<String> {
        self.values.get(name).filter(|v| !v.is_empty()).cloned()
    }
}

/// Text replaced for every secret occurrence.
pub const REDACTED: &str = "<redacted>";

/// Scrubs known secret values out of text. Cheap to clone; tokens learnt later (from a
/// login) are added with [`Redactor::add`] and apply to every clone.
#[derive(Clone, Default)]
pub struct Redactor {
    values: Arc<RwLock<Vec<String>>>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.values.read().map(|v| v.len()).unwrap_or(0);
        f.debug_struct("Redactor").field("secrets", &n).finish()
    }
}

impl Redactor {
    /// Remember `value` as secret (values shorter than 4 characters are ignored: scrubbing
    /// them would mangle ordinary text, and no real credential is that short).
    pub fn add(&self, value: &str) {
        if value.chars().count() < 4 {
            return;
        }
        if let Ok(mut v) = self.values.write()
            && !v.iter().any(|s| s == value)
        {
            v.push(value.to_owned());
            // Longest first, so a secret containing another is scrubbed whole.
            v.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    /// `text` with every known secret replaced by [`REDACTED`].
    pub fn scrub(&self, text: &str) -> String {
        let Ok(values) = self.values.read() else {
            return REDACTED.to_owned();
        };
        let mut out = text.to_owned();
        for v in values.iter() {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), REDACTED);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubs_longest_first_and_debug_hides_values() {
        let r = Redactor::default();
        r.add("abcd");
        r.add("abcdef-123");
        r.add("x");
        assert_eq!(r.scrub("a abcdef-123 abcd x"), "a <redacted> <redacted> x");
        let m = MapSecrets::new().with("PW", "hunter22");
        assert!(!format!("{m:?}").contains("hunter22"));
        assert_eq!(m.get("PW").as_deref(), Some("hunter22"));
        assert_eq!(m.get("NOPE"), None);
    }
}
