//! SQL text and value conversions shared by both backends.

use std::fmt::Write as _;
use std::time::Duration;

use crate::{MetaError, Result};

/// Digests per lookup query. Large enough that a 1 GiB upload of 64 KiB
/// chunks takes 256 round trips rather than 16384, small enough that each
/// statement plans and runs in well under a millisecond.
pub(crate) const READ_BATCH: usize = 64;

/// Keys per lookup for callers that ask about thousands at once
/// (FindMissingBlobs): each statement costs a round trip to the database
/// (for SQLite, to its worker thread), which dominates at 64 keys; 1024 binds
/// stay far below either database's parameter limit.
pub(crate) const WIDE_READ_BATCH: usize = 1024;

/// Rows per multi-row `INSERT`. The widest one binds 9 values a row plus 1,
/// far below SQLite's limit of 32766 bound parameters (Postgres allows 65535).
pub(crate) const WRITE_BATCH: usize = 1000;
const _: () = assert!(WRITE_BATCH * 9 + 1 < 32766);

/// `$first, $first+1, …` for `n` parameters.
pub(crate) fn params(first: usize, n: usize) -> String {
    let mut out = String::with_capacity(n * 5);
    for i in first..first + n {
        if i > first {
            out.push_str(", ");
        }
        write!(out, "${i}").expect("writing to a String cannot fail");
    }
    out
}

/// `n` row tuples of `width` consecutive parameters from `$first`, each
/// wrapped in `head` and `tail` (constants or shared parameters such as `$1`).
pub(crate) fn rows(first: usize, n: usize, width: usize, head: &str, tail: &str) -> String {
    let mut out = String::with_capacity(n * (width * 6 + head.len() + tail.len() + 4));
    for row in 0..n {
        if row > 0 {
            out.push_str(", ");
        }
        write!(out, "({head}{}{tail})", params(first + row * width, width))
            .expect("writing to a String cannot fail");
    }
    out
}

/// How many parameters to bind for an `IN` list of `n` values. Rounding up to
/// a power of two (repeating the last value, which `IN` ignores) leaves each
/// query with a handful of distinct texts, so the per-connection prepared
/// statement cache keeps hitting.
pub(crate) fn in_list_len(n: usize) -> usize {
    n.next_power_of_two()
}

/// The `i`-th value of a padded `IN` list over `items`.
pub(crate) fn padded<T>(items: &[T], i: usize) -> &T {
    &items[i.min(items.len() - 1)]
}

/// Removes repeats, keeping the first occurrence, so results follow the
/// caller's order.
pub(crate) fn dedup<T: Copy + Eq + std::hash::Hash>(items: &[T]) -> Vec<T> {
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    items.iter().copied().filter(|x| seen.insert(*x)).collect()
}

/// A size or offset as stored (BIGINT).
pub(crate) fn to_db(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| MetaError::Invalid(format!("{what} {value} exceeds i64")))
}

/// A stored size or offset; negative values cannot be written (CHECK) so one
/// means the row was tampered with.
pub(crate) fn from_db(value: i64, what: &str) -> Result<u64> {
    u64::try_from(value).map_err(|_| MetaError::Corrupt(format!("{what} is negative: {value}")))
}

pub(crate) fn digest(bytes: Vec<u8>, what: &str) -> Result<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| MetaError::Corrupt(format!("{what} has {} bytes, not 32", b.len())))
}

/// Seconds in a duration, saturating, for arithmetic with `now`.
pub(crate) fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}
