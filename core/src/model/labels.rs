//! An instance's labels: a small sorted map in one exact-size allocation.
//!
//! Every instance carries labels, usually a handful. A `BTreeMap<String, String>` gives
//! each non-empty map a whole B-tree leaf (eleven key/value slots, about 540 bytes)
//! however few labels it holds; with 10,000 endpoints in a sidecar, or 100,000 instances
//! in the registry, that leaf was the largest single item of the heap. `Labels` keeps the
//! pairs sorted by key in a boxed slice (48 bytes per label besides the strings), looks
//! keys up by binary search, and offers the `BTreeMap` methods the code uses, so callers
//! read the same.
//!
//! It serializes exactly as a `BTreeMap` does (a map, keys in order), so the Raft log,
//! snapshots, the disk cache and JSON APIs see the same bytes as before.

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Label key -> value, sorted by key, keys unique.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn position<Q>(&self, key: &Q) -> Result<usize, usize>
    where
        String: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.0.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    /// The value of `key`, if it is set.
    pub fn get<Q>(&self, key: &Q) -> Option<&String>
    where
        String: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.position(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        String: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`, returning the value it replaced.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.position(key.as_str()) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                let mut pairs = std::mem::take(&mut self.0).into_vec();
                pairs.insert(i, (key, value));
                self.0 = pairs.into_boxed_slice();
                None
            }
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<String>
    where
        String: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let i = self.position(key).ok()?;
        let mut pairs = std::mem::take(&mut self.0).into_vec();
        let (_, value) = pairs.remove(i);
        self.0 = pairs.into_boxed_slice();
        Some(value)
    }

    /// The pairs in key order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator + '_ {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator + '_ {
        self.0.iter().map(|(_, v)| v)
    }
}

/// The pairs of a [`Labels`] in key order, as `BTreeMap::iter` yields them.
#[derive(Clone, Debug)]
pub struct Iter<'a>(std::slice::Iter<'a, (String, String)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a String, &'a String);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().map(|(k, v)| (k, v))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back().map(|(k, v)| (k, v))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl FromIterator<(String, String)> for Labels {
    /// As `BTreeMap`'s: sorted by key, and of a key given twice the last value wins.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let mut pairs: Vec<(String, String)> = iter.into_iter().collect();
        // Stable, so equal keys keep their order and the last one can be kept.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, String)> = Vec::with_capacity(pairs.len());
        for pair in pairs {
            match out.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => out.push(pair),
            }
        }
        Self(out.into_boxed_slice())
    }
}

impl Extend<(String, String)> for Labels {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, iter: I) {
        let pairs = std::mem::take(&mut self.0).into_vec();
        *self = pairs.into_iter().chain(iter).collect();
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        // Already sorted and unique.
        Self(map.into_iter().collect::<Vec<_>>().into_boxed_slice())
    }
}

impl From<&Labels> for BTreeMap<String, String> {
    fn from(labels: &Labels) -> Self {
        labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl IntoIterator for Labels {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_vec().into_iter()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<Q> std::ops::Index<&Q> for Labels
where
    String: Borrow<Q>,
    Q: Ord + ?Sized,
{
    type Output = String;

    /// As `BTreeMap`'s: panics when the key is absent (tests only; code uses `get`).
    fn index(&self, key: &Q) -> &String {
        self.get(key).expect("no such label")
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LabelsVisitor;

        impl<'de> Visitor<'de> for LabelsVisitor {
            type Value = Labels;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of label keys to values")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Labels, A::Error> {
                // The hint comes from the input: bounded, so a hostile length cannot
                // reserve memory the input does not hold.
                let mut pairs = Vec::with_capacity(access.size_hint().unwrap_or(0).min(64));
                while let Some(pair) = access.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(pairs.into_iter().collect())
            }
        }

        deserializer.deserialize_map(LabelsVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(n: usize) -> Vec<(String, String)> {
        // Out of order, with a repeated key whose last value must win.
        let mut v: Vec<(String, String)> = (0..n)
            .rev()
            .map(|i| (format!("k{i:02}"), format!("v{i}")))
            .collect();
        v.push(("k00".into(), "last".into()));
        v
    }

    #[test]
    fn it_behaves_as_a_btreemap() {
        let labels: Labels = pairs(12).into_iter().collect();
        let map: BTreeMap<String, String> = pairs(12).into_iter().collect();
        assert_eq!(labels.len(), map.len());
        assert!(labels.iter().eq(map.iter()));
        assert_eq!(labels.get("k00").map(String::as_str), Some("last"));
        assert_eq!(labels["k05"], "v5");
        assert!(labels.get("nope").is_none());
        assert!(labels.keys().eq(map.keys()));
        assert!(labels.values().eq(map.values()));

        let (mut labels, mut map) = (labels, map);
        for (k, v) in [("a", "1"), ("k05", "new"), ("zz", "2")] {
            assert_eq!(
                labels.insert(k.into(), v.into()),
                map.insert(k.into(), v.into())
            );
        }
        for k in ["k03", "absent", "a"] {
            assert_eq!(labels.remove(k), map.remove(k));
        }
        assert!(labels.iter().eq(map.iter()));
        labels.extend([("k01".to_string(), "x".to_string())]);
        map.extend([("k01".to_string(), "x".to_string())]);
        assert!(labels.iter().eq(map.iter()));
        assert_eq!(Labels::from(map.clone()), labels);
        assert_eq!(BTreeMap::from(&labels), map);
        assert_eq!(format!("{labels:?}"), format!("{map:?}"));
    }

    #[test]
    fn it_serializes_byte_for_byte_as_a_btreemap() {
        let labels: Labels = pairs(5).into_iter().collect();
        let map: BTreeMap<String, String> = pairs(5).into_iter().collect();
        let wire = postcard::to_allocvec(&labels).expect("postcard");
        assert_eq!(wire, postcard::to_allocvec(&map).expect("postcard"));
        assert_eq!(postcard::from_bytes::<Labels>(&wire).expect("back"), labels);
        let json = serde_json::to_string(&labels).expect("json");
        assert_eq!(json, serde_json::to_string(&map).expect("json"));
        let back: Labels = serde_json::from_str(r#"{"b":"2","a":"1","b":"3"}"#).expect("json");
        assert_eq!(back.iter().collect::<Vec<_>>().len(), 2);
        assert_eq!(back["b"], "3");
        assert!(serde_json::from_str::<Labels>(r#"["a"]"#).is_err());
    }
}
