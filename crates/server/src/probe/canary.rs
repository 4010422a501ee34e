//! What the write canaries write: a tiny store path unique to each run for
//! Nix (deleted afterwards when the token may), and fixed bytes for REAPI,
//! which has no delete: every probe writes the same blob and action result,
//! so repeated probes store nothing new.

use garret_nix::nar::NarWriter;
use garret_nix::{Sha256Hash, StorePath, StorePathHash};

/// The name of every Nix canary path.
pub const NIX_NAME: &str = "garret-probe-canary";

/// A generated store path and its NAR: one regular file with a random line.
#[derive(Debug)]
pub struct NixCanary {
    pub path: StorePath,
    pub nar: Vec<u8>,
    pub nar_hash: Sha256Hash,
}

impl NixCanary {
    /// A path no build produces: its hash is random, so each run writes a
    /// path of its own and reads back what it wrote, not an earlier run's.
    pub fn generate() -> Result<Self, String> {
        let mut random = [0u8; 20];
        getrandom::fill(&mut random).map_err(|e| format!("no randomness: {e}"))?;
        let path = StorePath::new(StorePathHash::from_bytes(random), NIX_NAME)
            .map_err(|e| e.to_string())?;
        let contents = format!("garret probe canary {path}\n");
        let mut nar = NarWriter::new(Vec::new()).map_err(|e| e.to_string())?;
        nar.file(false, contents.len() as u64, contents.as_bytes())
            .map_err(|e| e.to_string())?;
        let nar = nar.finish().map_err(|e| e.to_string())?;
        Ok(Self {
            nar_hash: Sha256Hash::of(&nar),
            path,
            nar,
        })
    }
}

/// The CAS blob of the REAPI canary.
pub const REAPI_BLOB: &[u8] = b"garret probe canary\n";

/// The "action" whose result the REAPI canary writes: a fixed text that no
/// real action's encoding equals, so its digest names no real action.
pub const REAPI_ACTION: &[u8] = b"garret probe canary action";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_nix_canary_is_its_own_valid_nar() {
        let (a, b) = (
            NixCanary::generate().unwrap(),
            NixCanary::generate().unwrap(),
        );
        assert_ne!(a.path, b.path);
        assert_eq!(a.path.name(), NIX_NAME);
        let mut verifier = garret_nix::nar::Verifier::new();
        verifier.update(&a.nar).unwrap();
        assert_eq!(verifier.finish().unwrap(), (a.nar_hash, a.nar.len() as u64));
    }
}
