//! Adopting another cache server's deployment: its caches, keys and store
//! paths, read from its database and fetched through its substituter.

pub mod attic;
pub mod substituter;
