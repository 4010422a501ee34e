//! NAR, the Nix ARchive: the byte-exact serialisation of a store path's file
//! tree whose SHA-256 is the path's `NarHash`.
//!
//! [`wire`] holds the grammar. [`Decoder`] validates and walks an archive pushed
//! to it in pieces, [`Verifier`] adds the hash, and [`NarWriter`] and
//! [`dump_path`] produce archives byte-identical to `nix-store --dump`.

mod decoder;
mod error;
#[cfg(test)]
mod tests;
pub mod wire;
mod writer;

pub use decoder::{Decoder, Verifier, Visitor, parse};
pub use error::NarError;
pub use writer::{NarWriter, dump_path};
