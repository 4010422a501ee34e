//! Wall-clock time as the metadata layer wants it: unix seconds, passed in
//! explicitly so that tests and GC can drive time themselves.

pub fn unix_now() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
}
