//! Narinfo signatures, kept once made.
//!
//! Every narinfo is signed when it is served, with the cache's current key
//! (as in Attic), so rotating a key re-signs everything at once. Signing
//! costs an ed25519 signature, and parsing the key from its text first costs
//! about as much again (the public half is checked against the seed); on a
//! narinfo hit the two were most of the server's CPU. Both are pure
//! functions of their input, so this cache keeps their results:
//! - parsed keys, by the SHA-256 of the key text, so the text (the secret)
//!   is not kept a second time as a map key;
//! - signatures, by the SHA-256 of that key digest and the fingerprint. The
//!   key is part of the entry's name, so a rotated key (new text, new digest)
//!   finds none of the old key's entries and signs afresh; the old entries
//!   age out.
//!
//! Both maps are least-recently-used with fixed bounds, so memory stays
//! bounded however many paths and keys pass through (see [`SIGNATURES`] and
//! [`KEYS`]). A miss signs outside the lock; two requests that miss the same
//! entry at once both sign, and both get the same (deterministic) signature.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use garret_nix::signing::{Signature, SigningError, SigningKey};
use garret_nix::{Sha256Hash, Sha256Hasher};
use lru::LruCache;

/// Signatures kept: 64 Ki. An entry is about 200 bytes (its 32-byte name,
/// the 64-byte signature with its key name, the LRU links and the table
/// slot), so a full cache holds about 13 MiB; that covers the narinfos of
/// many whole system closures.
pub const SIGNATURES: NonZeroUsize = NonZeroUsize::new(1 << 16).expect("not zero");

/// Parsed keys kept: one per cache key in use, and caches are few; a server
/// with more keys than this only parses some of them again.
pub const KEYS: NonZeroUsize = NonZeroUsize::new(1024).expect("not zero");

/// Parsed signing keys and the signatures they made, bounded (see the
/// module documentation).
pub struct Signatures {
    keys: Mutex<LruCache<Sha256Hash, Arc<SigningKey>>>,
    signatures: Mutex<LruCache<Sha256Hash, Signature>>,
}

impl Default for Signatures {
    /// Bounded by [`KEYS`] and [`SIGNATURES`].
    fn default() -> Self {
        Self::new(KEYS, SIGNATURES)
    }
}

// By hand: neither map's entries belong in a log (the keys are secrets).
impl fmt::Debug for Signatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signatures")
            .field("keys", &lock(&self.keys).len())
            .field("signatures", &lock(&self.signatures).len())
            .finish()
    }
}

impl Signatures {
    /// Keeps at most `keys` parsed keys and `signatures` signatures.
    pub fn new(keys: NonZeroUsize, signatures: NonZeroUsize) -> Self {
        Self {
            keys: Mutex::new(LruCache::new(keys)),
            signatures: Mutex::new(LruCache::new(signatures)),
        }
    }

    /// The signature of `fingerprint` under `secret_key`, the key's text
    /// (`name:base64`, as `nix-store --generate-binary-cache-key` writes it):
    /// the one made earlier if it is still kept, else a new one.
    pub fn sign(&self, secret_key: &str, fingerprint: &str) -> Result<Signature, SigningError> {
        let key_id = Sha256Hash::of(secret_key.as_bytes());
        let entry = entry(&key_id, fingerprint);
        if let Some(signature) = lock(&self.signatures).get(&entry) {
            return Ok(signature.clone());
        }
        let signature = self.key(key_id, secret_key)?.sign(fingerprint.as_bytes());
        lock(&self.signatures).put(entry, signature.clone());
        Ok(signature)
    }

    /// The parsed key whose text hashes to `id`, parsing `text` if it is not
    /// kept. A key that does not parse is not kept.
    fn key(&self, id: Sha256Hash, text: &str) -> Result<Arc<SigningKey>, SigningError> {
        if let Some(key) = lock(&self.keys).get(&id) {
            return Ok(Arc::clone(key));
        }
        let key = Arc::new(text.parse::<SigningKey>()?);
        lock(&self.keys).put(id, Arc::clone(&key));
        Ok(key)
    }
}

/// The name of a signature entry: fixed-length key digest, then the
/// fingerprint, so no two (key, fingerprint) pairs share an input.
fn entry(key_id: &Sha256Hash, fingerprint: &str) -> Sha256Hash {
    let mut hasher = Sha256Hasher::new();
    hasher.update(key_id.as_bytes());
    hasher.update(fingerprint.as_bytes());
    hasher.finish().0
}

/// A panic while a map was locked leaves at worst an entry missing, never a
/// wrong one (each `get` and `put` is one step), so the map stays usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_key(name: &str) -> String {
        SigningKey::generate(name).unwrap().to_secret_string()
    }

    fn bound(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn same_input_same_signature() {
        let cache = Signatures::default();
        let key = new_key("cache-1");
        let first = cache.sign(&key, "1;/nix/store/a;sha256:x;1;").unwrap();
        let again = cache.sign(&key, "1;/nix/store/a;sha256:x;1;").unwrap();
        assert_eq!(first, again);
        // And it is the signature the key itself makes.
        let direct = key
            .parse::<SigningKey>()
            .unwrap()
            .sign(b"1;/nix/store/a;sha256:x;1;");
        assert_eq!(first, direct);
        assert_eq!(lock(&cache.keys).len(), 1);
        assert_eq!(lock(&cache.signatures).len(), 1);
    }

    #[test]
    fn a_rotated_key_signs_again() {
        let cache = Signatures::default();
        let (old, new) = (new_key("cache-1"), new_key("cache-1"));
        let fingerprint = "1;/nix/store/a;sha256:x;1;";
        let before = cache.sign(&old, fingerprint).unwrap();
        let after = cache.sign(&new, fingerprint).unwrap();
        assert_ne!(before, after);
        let public = new.parse::<SigningKey>().unwrap().verifying_key();
        assert!(public.verify(fingerprint.as_bytes(), &after));
        assert!(!public.verify(fingerprint.as_bytes(), &before));
        // A different fingerprint under one key is a different entry too.
        assert_ne!(
            cache.sign(&new, "1;/nix/store/b;sha256:x;1;").unwrap(),
            after
        );
    }

    #[test]
    fn entries_stay_within_the_bounds() {
        let cache = Signatures::new(bound(2), bound(4));
        let keys: Vec<String> = (0..3).map(|i| new_key(&format!("k{i}"))).collect();
        for key in &keys {
            for i in 0..10 {
                cache.sign(key, &format!("fingerprint {i}")).unwrap();
            }
        }
        assert_eq!(lock(&cache.keys).len(), 2);
        assert_eq!(lock(&cache.signatures).len(), 4);
        // The most recent entries are the ones kept.
        let last = Sha256Hash::of(keys[2].as_bytes());
        assert!(lock(&cache.keys).contains(&last));
        assert!(
            lock(&cache.signatures).contains(&entry(&last, "fingerprint 9")),
            "the newest signature was evicted"
        );
        assert!(!lock(&cache.signatures).contains(&entry(&last, "fingerprint 0")));
    }

    #[test]
    fn a_bad_key_is_an_error_and_not_kept() {
        let cache = Signatures::default();
        assert_eq!(
            cache.sign("no colon", "fingerprint"),
            Err(SigningError::MissingColon)
        );
        assert_eq!(lock(&cache.keys).len(), 0);
        assert_eq!(lock(&cache.signatures).len(), 0);
    }
}
