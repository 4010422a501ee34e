//! Nix wire formats for garret, written against the behaviour of the Nix 2.8
//! client. Sync and runtime-free: the server decides how to drive it.

pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signing;
pub mod store_path;

pub use hash::{Sha256Hash, Sha256Hasher};
pub use store_path::{StorePath, StorePathHash};
