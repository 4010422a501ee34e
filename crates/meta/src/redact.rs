//! Secrets in `Debug` output: the one way garret's hand-written `Debug`
//! impls leave them out, so logging a value never logs its secret.

use std::fmt;

/// Prints `<redacted>` in place of a secret.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An optional secret for `Debug`: whether it is set, never what it is.
pub fn redact<T>(secret: Option<&T>) -> Option<Redacted> {
    secret.map(|_| Redacted)
}
