//! `--endpoint ID` / `--only GLOB`: run a command for some endpoints of the configuration.

use anyhow::{Result, bail};
use bulwark_workflows::adapter::EndpointConfig;

/// Which endpoints a `sync` or `reconcile` covers (all, without either flag).
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct ScopeArgs {
    /// Only this endpoint (repeatable); an id the configuration does not have is an error.
    #[arg(long = "endpoint", value_name = "ID")]
    pub(crate) ids: Vec<String>,
    /// Only endpoints whose id matches this pattern (`*` any run of characters, `?` one
    /// character; repeatable), e.g. `--only 'shop-eu-*'`; a pattern matching nothing is an
    /// error.
    #[arg(long = "only", value_name = "GLOB")]
    pub(crate) globs: Vec<String>,
}

impl ScopeArgs {
    /// Whether a scope was given.
    pub(crate) fn is_set(&self) -> bool {
        !(self.ids.is_empty() && self.globs.is_empty())
    }

    /// Keep the endpoints in scope (those named or matched by any flag).
    pub(crate) fn apply(&self, endpoints: &mut Vec<EndpointConfig>) -> Result<()> {
        if !self.is_set() {
            return Ok(());
        }
        for id in &self.ids {
            if !endpoints.iter().any(|e| &e.id == id) {
                bail!("--endpoint {id:?}: no such endpoint in the configuration");
            }
        }
        for g in &self.globs {
            if !endpoints.iter().any(|e| glob_match(g, &e.id)) {
                bail!("--only {g:?} matches no endpoint of the configuration");
            }
        }
        endpoints.retain(|e| {
            self.ids.iter().any(|id| id == &e.id) || self.globs.iter().any(|g| glob_match(g, &e.id))
        });
        Ok(())
    }
}

/// `*` matches any run of characters (also none), `?` exactly one; everything else itself.
pub(crate) fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Greedy with backtracking to the last `*`: linear in practice.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("shop-*", "shop-1", true),
            ("shop-*", "shop-", true),
            ("shop-*", "shopx", false),
            ("*-eu-*", "a-eu-b", true),
            ("ep-0000?", "ep-00001", true),
            ("ep-0000?", "ep-000012", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(p, t), m, "{p} {t}");
        }
    }

    #[test]
    fn scope_keeps_the_named_and_matched_and_refuses_what_matches_nothing() {
        let eps = |ids: &[&str]| -> Vec<EndpointConfig> {
            ids.iter()
                .map(|id| EndpointConfig {
                    id: (*id).into(),
                    adapter: "rest".into(),
                    settings: Default::default(),
                    policy: None,
                })
                .collect()
        };
        let mut all = eps(&["a-1", "a-2", "b-1"]);
        ScopeArgs {
            ids: vec!["b-1".into()],
            globs: vec!["a-?".into()],
        }
        .apply(&mut all)
        .unwrap();
        assert_eq!(all.len(), 3);
        let mut all = eps(&["a-1", "a-2", "b-1"]);
        ScopeArgs {
            ids: vec![],
            globs: vec!["a-*".into()],
        }
        .apply(&mut all)
        .unwrap();
        assert_eq!(
            all.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a-1", "a-2"]
        );
        let err = ScopeArgs {
            ids: vec!["c".into()],
            globs: vec![],
        }
        .apply(&mut eps(&["a"]))
        .unwrap_err();
        assert!(err.to_string().contains("--endpoint \"c\""), "{err}");
        let err = ScopeArgs {
            ids: vec![],
            globs: vec!["z*".into()],
        }
        .apply(&mut eps(&["a"]))
        .unwrap_err();
        assert!(err.to_string().contains("matches no endpoint"), "{err}");
    }
}
