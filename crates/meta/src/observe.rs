//! A seam for watching database operations without this crate knowing who
//! watches: the server times them for its metrics, tests count them.
//!
//! Every query runs through `on_reader!` or `on_writer!`, so those two
//! macros report each operation once, named after the [`crate::Meta`]
//! method it serves (a bounded set: one name per method), with its time
//! (a write's retries included, as its caller waits for them) and whether
//! the database failed it. Outcomes that are answers, not failures (a row
//! not found, a chunk being collected), do not count as failed.

use std::time::Duration;

use crate::MetaError;

/// Told of every database operation a [`crate::Meta`] finishes.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// `operation` is the method's name (`cache`, `commit_blob`, …).
    fn finished(&self, operation: &'static str, elapsed: Duration, failed: bool);
}

/// Whether an operation's result is the database failing it.
pub(crate) trait Outcome {
    fn failed(&self) -> bool;
}

impl<T> Outcome for Result<T, sqlx::Error> {
    fn failed(&self) -> bool {
        self.is_err()
    }
}

impl<T> Outcome for Result<T, MetaError> {
    fn failed(&self) -> bool {
        matches!(self, Err(MetaError::Database(_)))
    }
}

/// The method a `type_name` of a function item declared inside it names:
/// `garret_meta::caches::<impl garret_meta::Meta>::cache::{{closure}}::here`
/// gives `cache`. The format of `type_name` is not guaranteed, so anything
/// unexpected gives the whole text rather than a panic: still one value
/// per call site.
pub(crate) fn method_name(type_name: &'static str) -> &'static str {
    let mut path = type_name.strip_suffix("::here").unwrap_or(type_name);
    while let Some(outer) = path.strip_suffix("::{{closure}}") {
        path = outer;
    }
    path.rsplit("::").next().unwrap_or(path)
}

/// The name of the [`crate::Meta`] method this expands in, for
/// [`Observer::finished`]; a `&'static str` found without allocating.
macro_rules! operation {
    () => {{
        fn here() {}
        $crate::observe::method_name(::std::any::type_name_of_val(&here))
    }};
}
pub(crate) use operation;
