//! Virtual API keys → access group.
//!
//! Client keys are stored only as SHA-256 digests, and a lookup compares digests in constant time
//! (`subtle`), so neither memory dumps nor response timing reveal a key. The key is read from
//! `Authorization: Bearer`, `x-api-key` (Anthropic SDKs) or `api-key` (Azure SDKs). Missing and
//! unknown keys get the same 401 body.
//!
//! A check says which key called as a [`KeyId`]: the first 8 bytes of the key's SHA-256, in hex.
//! It is the same on every replica and after every reload (it depends on the key alone), so limits,
//! spend and logs can count per key, and it never is the key itself.

use http::HeaderMap;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use subtle::ConstantTimeEq;

/// A SHA-256 digest compared in constant time.
#[derive(Clone, Copy, Debug)]
struct Digest([u8; 32]);

impl PartialEq for Digest {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl Eq for Digest {}

impl Hash for Digest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0[..8]);
    }
}

impl Digest {
    fn id(&self) -> KeyId {
        let mut id = [0; 8];
        id.copy_from_slice(&self.0[..8]);
        KeyId(id)
    }
}

fn digest(key: &str) -> Digest {
    Digest(Sha256::digest(key.as_bytes()).into())
}

/// Hashed client keys and the group each belongs to.
#[derive(Default)]
pub struct Keys {
    by_digest: HashMap<Digest, usize>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({} hashed)", self.by_digest.len())
    }
}

impl Keys {
    /// Adds a key for `group`; returns the group already holding it, if any.
    pub fn insert(&mut self, key: &str, group: usize) -> Option<usize> {
        match self.by_digest.entry(digest(key)) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(group);
                None
            }
        }
    }

    /// The group of `key`, if it is known.
    pub fn group_of(&self, key: &str) -> Option<usize> {
        self.by_digest.get(&digest(key)).copied()
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// Every key's id and group.
    pub fn ids(&self) -> impl Iterator<Item = (KeyId, usize)> + '_ {
        self.by_digest.iter().map(|(d, g)| (d.id(), *g))
    }

    /// How many keys belong to `group`.
    pub fn count(&self, group: usize) -> usize {
        self.by_digest.values().filter(|&&g| g == group).count()
    }
}

/// The client's key from `Authorization: Bearer`, `x-api-key` or `api-key`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?.trim();
        let (scheme, key) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| key.trim());
    }
    ["x-api-key", "api-key"].iter().find_map(|h| headers.get(*h)).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// A stable, non-secret id of a client key: the first 8 bytes of its SHA-256.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Who is calling: the access group, and the key (none in open mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Group id (index into `Config::groups`).
    pub group: usize,
    /// The key that authenticated the request.
    pub key: Option<KeyId>,
}

/// The caller of a request: its key's group; in open mode (`open_group`), anyone, with no key.
pub fn check(keys: &Keys, open_group: Option<usize>, headers: &HeaderMap) -> Option<Caller> {
    if let Some(group) = open_group {
        return Some(Caller { group, key: None });
    }
    let d = digest(presented_key(headers)?);
    let group = keys.by_digest.get(&d).copied()?;
    Some(Caller { group, key: Some(d.id()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), http::HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn keys_are_found_from_every_header_form() {
        let mut keys = Keys::default();
        keys.insert("sk-1", 3);
        for h in [
            headers(&[("authorization", "Bearer sk-1")]),
            headers(&[("authorization", "bearer  sk-1 ")]),
            headers(&[("x-api-key", "sk-1")]),
            headers(&[("api-key", "sk-1")]),
        ] {
            assert_eq!(check(&keys, None, &h).map(|c| c.group), Some(3), "{h:?}");
        }
    }

    #[test]
    fn unknown_missing_and_malformed_keys_are_refused() {
        let mut keys = Keys::default();
        keys.insert("sk-1", 0);
        for h in [
            headers(&[]),
            headers(&[("authorization", "Bearer sk-2")]),
            headers(&[("authorization", "Basic sk-1")]),
            headers(&[("authorization", "sk-1")]),
            headers(&[("x-api-key", "sk-1x")]),
        ] {
            assert_eq!(check(&keys, None, &h), None, "{h:?}");
        }
    }

    #[test]
    fn open_mode_lets_anyone_in() {
        assert_eq!(check(&Keys::default(), Some(1), &headers(&[])), Some(Caller { group: 1, key: None }));
    }

    #[test]
    fn the_key_id_is_a_stable_digest_prefix_and_never_the_key() {
        let mut keys = Keys::default();
        keys.insert("sk-1", 0);
        keys.insert("sk-2", 0);
        let id = |k: &'static str| check(&keys, None, &headers(&[("x-api-key", k)])).unwrap().key.unwrap();
        // Computed independently: `printf sk-1 | sha256sum` begins 0f2c10bf3d128c71.
        assert_eq!(id("sk-1").to_string(), "0f2c10bf3d128c71");
        assert_eq!(id("sk-1"), id("sk-1"));
        assert_ne!(id("sk-1"), id("sk-2"));
        assert_eq!(id("sk-1").to_string().len(), 16);
        assert!(!id("sk-1").to_string().contains("sk-1"));
    }

    #[test]
    fn duplicate_keys_are_reported() {
        let mut keys = Keys::default();
        assert_eq!(keys.insert("k", 0), None);
        assert_eq!(keys.insert("k", 1), Some(0));
    }
}
