//! [`ItemSet`]: a compact set of item positions within a batch, journaled as ranges
//! (`"0-17,19,22-40"`), so per-item progress of a 500-item batch costs a few bytes per
//! transition.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A set of item positions (0-based, within one batch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ItemSet(Vec<u32>);

impl ItemSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions `0..n`.
    pub fn all(n: u32) -> Self {
        Self((0..n).collect())
    }

    /// Is the set empty?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of positions.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Is `i` in the set?
    pub fn contains(&self, i: u32) -> bool {
        self.0.binary_search(&i).is_ok()
    }

    /// Add `i`; returns whether it was new.
    pub fn insert(&mut self, i: u32) -> bool {
        match self.0.binary_search(&i) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, i);
                true
            }
        }
    }

    /// Add every position of `other`; returns how many were new.
    pub fn extend(&mut self, other: &ItemSet) -> usize {
        let before = self.0.len();
        let mut merged = Vec::with_capacity(before + other.0.len());
        let (mut a, mut b) = (self.0.iter().peekable(), other.0.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(&&x), Some(&&y)) if x == y => {
                    a.next();
                    b.next();
                    x
                }
                (Some(&&x), Some(&&y)) if x < y => {
                    a.next();
                    x
                }
                (Some(_), Some(&&y)) => {
                    b.next();
                    y
                }
                (Some(&&x), None) => {
                    a.next();
                    x
                }
                (None, Some(&&y)) => {
                    b.next();
                    y
                }
                (None, None) => break,
            };
            merged.push(next);
        }
        self.0 = merged;
        self.0.len() - before
    }

    /// The positions, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }
}

impl FromIterator<u32> for ItemSet {
    fn from_iter<T: IntoIterator<Item = u32>>(iter: T) -> Self {
        let mut v: Vec<u32> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Self(v)
    }
}

impl fmt::Display for ItemSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

impl std::str::FromStr for ItemSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut v = Vec::new();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let bad = || format!("item set {s:?}: {part:?} is not a position or a range");
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a, b),
                None => (part, part),
            };
            let (a, b): (u32, u32) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if b < a || v.last().is_some_and(|&l| l >= a) {
                return Err(format!("item set {s:?}: ranges must ascend"));
            }
            v.extend(a..=b);
        }
        Ok(Self(v))
    }
}

impl Serialize for ItemSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ItemSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_are_compact() {
        let s: ItemSet = [0, 1, 2, 3, 7, 9, 10].into_iter().collect();
        assert_eq!(s.to_string(), "0-3,7,9-10");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"0-3,7,9-10\"");
        assert_eq!(ItemSet::new().to_string(), "");
        assert!("3-1".parse::<ItemSet>().is_err());
        assert!("1,1".parse::<ItemSet>().is_err());
        assert!("x".parse::<ItemSet>().is_err());
    }

    proptest! {
        #[test]
        fn round_trips_and_unions(a in proptest::collection::vec(0u32..300, 0..80),
                                  b in proptest::collection::vec(0u32..300, 0..80)) {
            let sa: ItemSet = a.iter().copied().collect();
            let back: ItemSet = sa.to_string().parse().unwrap();
            prop_assert_eq!(&back, &sa);
            let mut u = sa.clone();
            let sb: ItemSet = b.iter().copied().collect();
            let added = u.extend(&sb);
            let want: std::collections::BTreeSet<u32> = a.iter().chain(b.iter()).copied().collect();
            prop_assert_eq!(u.iter().collect::<Vec<_>>(), want.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(added, want.len() - sa.len());
        }
    }
}
