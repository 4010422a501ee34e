//! Human durations and sizes, written and read the same way everywhere:
//! token lifetimes (`garret token create --validity 90d`), retention
//! periods (`garret cache configure --retention 30d`, `gc.default_retention`)
//! and budgets (`--cas-budget 50GiB`).

use std::fmt::Write as _;
use std::time::Duration;

/// Why a duration string was refused; a parsing error with no HTTP meaning.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration `{input}`: {reason} (use a number and a unit s, m, h, d, w or y, \
     e.g. 90d, 1y, 12h, 30m, 1d12h)"
)]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

/// Parses lifetimes such as `90d`, `1y`, `12h`, `30m` or `1y6w`.
///
/// `m` is minutes (no months, which have no fixed length) and `y` is 365
/// days, so `1y` expires on the same calendar date except across Feb 29.
pub fn parse_duration(input: &str) -> Result<Duration, ParseDurationError> {
    let error = |reason| ParseDurationError {
        input: input.to_owned(),
        reason,
    };
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(error("empty"));
    }
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(error("expected a number"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| error("number too large"))?;
        rest = &rest[digits..];
        let unit = rest.chars().next().ok_or_else(|| error("missing unit"))?;
        let seconds = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            'y' => 365 * 86_400,
            _ => return Err(error("unknown unit")),
        };
        rest = &rest[unit.len_utf8()..];
        total = number
            .checked_mul(seconds)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| error("too long"))?;
    }
    if total == 0 {
        return Err(error("must be longer than zero"));
    }
    Ok(Duration::from_secs(total))
}

/// A duration in the largest units that divide it exactly, as
/// [`parse_duration`] reads it back: `30d`, `1d12h`, `1m30s`; `0s` for zero.
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(u64, char); 5] = [
        (365 * 86_400, 'y'),
        (86_400, 'd'),
        (3600, 'h'),
        (60, 'm'),
        (1, 's'),
    ];
    let mut rest = d.as_secs();
    if rest == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (seconds, unit) in UNITS {
        if rest >= seconds {
            write!(out, "{}{unit}", rest / seconds).expect("writing to a String cannot fail");
            rest %= seconds;
        }
    }
    out
}

/// A cache's retention as it applies, with where it comes from: its own
/// period (Attic's meaning: `Some(0)` keeps forever) or, at `None`, the
/// server's `gc.default_retention`. `garret cache info` and the status
/// page say it in these words.
pub fn describe_retention(period: Option<i64>, default: Option<Duration>) -> String {
    let keep = "keep forever";
    match period {
        Some(0) => keep.to_owned(),
        Some(secs) => format_duration(Duration::from_secs(secs.unsigned_abs())),
        None => format!(
            "global default ({})",
            default.map_or_else(|| keep.to_owned(), format_duration)
        ),
    }
}

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size `{input}`: {reason} (use a whole number and a unit B, KiB, MiB, GiB, TiB \
     or kB, MB, GB, TB, e.g. 50GiB, 500MB)"
)]
pub struct ParseSizeError {
    input: String,
    reason: &'static str,
}

/// Binary units first: [`format_size`] prefers them.
const SIZE_UNITS: [(&str, u64); 9] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("TB", 1_000_000_000_000),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("kB", 1_000),
    ("B", 1),
];

/// Parses byte sizes such as `50GiB`, `500MB` or `1048576` (bytes). Units
/// are matched without regard to case (`gib`, `KB`), and a space may
/// separate them from the number. Only whole numbers: `1.5GiB` is `1536MiB`.
pub fn parse_size(input: &str) -> Result<u64, ParseSizeError> {
    let error = |reason| ParseSizeError {
        input: input.to_owned(),
        reason,
    };
    let text = input.trim();
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    if digits == 0 {
        return Err(error(if text.is_empty() {
            "empty"
        } else {
            "expected a number"
        }));
    }
    let number: u64 = text[..digits]
        .parse()
        .map_err(|_| error("number too large"))?;
    let unit = text[digits..].trim_start();
    let multiplier = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))
            .map(|(_, bytes)| *bytes)
            .ok_or_else(|| error("unknown unit"))?
    };
    let bytes = number
        .checked_mul(multiplier)
        .ok_or_else(|| error("too large"))?;
    if bytes == 0 {
        return Err(error("must be larger than zero"));
    }
    Ok(bytes)
}

/// A size in the largest binary unit that divides it exactly, as
/// [`parse_size`] reads it back: `50GiB`, `1536MiB`, `1000B`.
pub fn format_size(bytes: u64) -> String {
    SIZE_UNITS
        .iter()
        .filter(|(name, _)| name.ends_with("iB") || *name == "B")
        .find(|(_, unit)| bytes >= *unit && bytes.is_multiple_of(*unit))
        .map_or_else(
            || "0B".to_owned(),
            |(name, unit)| format!("{}{name}", bytes / unit),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        let day = 86_400;
        let cases = [
            ("90d", 90 * day),
            ("1y", 365 * day),
            ("12h", 12 * 3600),
            ("30m", 30 * 60),
            ("45s", 45),
            ("2w", 14 * day),
            ("1d12h", day + 12 * 3600),
            (" 7d ", 7 * day),
            ("0d1s", 1),
        ];
        for (input, seconds) in cases {
            assert_eq!(
                parse_duration(input),
                Ok(Duration::from_secs(seconds)),
                "{input}"
            );
        }
    }

    #[test]
    fn bad_durations() {
        let cases = [
            ("", "empty"),
            ("d", "expected a number"),
            ("90", "missing unit"),
            ("1M", "unknown unit"),
            ("1 d", "unknown unit"),
            ("1.5d", "unknown unit"),
            ("-1d", "expected a number"),
            ("0s", "must be longer than zero"),
            ("99999999999999999999s", "number too large"),
            ("999999999999999y", "too long"),
        ];
        for (input, reason) in cases {
            assert_eq!(
                parse_duration(input),
                Err(ParseDurationError {
                    input: input.to_owned(),
                    reason
                }),
                "{input}"
            );
        }
        assert!(
            parse_duration("1M")
                .unwrap_err()
                .to_string()
                .contains("e.g. 90d")
        );
    }

    #[test]
    fn durations_print_as_they_parse() {
        for text in ["30d", "1d12h", "1m30s", "1y6d", "12h30m", "1s"] {
            let parsed = parse_duration(text).unwrap();
            assert_eq!(format_duration(parsed), text);
        }
        assert_eq!(format_duration(Duration::from_hours(24 * 14)), "14d");
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn human_sizes() {
        let cases = [
            ("50GiB", 50 << 30),
            ("50 gib", 50 << 30),
            ("1TiB", 1 << 40),
            ("512KiB", 512 << 10),
            ("500MB", 500_000_000),
            ("2kb", 2000),
            ("1048576", 1 << 20),
            ("7B", 7),
        ];
        for (input, bytes) in cases {
            assert_eq!(parse_size(input), Ok(bytes), "{input}");
        }
        for (input, reason) in [
            ("", "empty"),
            ("GiB", "expected a number"),
            ("-1GiB", "expected a number"),
            ("1.5GiB", "unknown unit"),
            ("3 parsecs", "unknown unit"),
            ("0GiB", "must be larger than zero"),
            ("99999999999999999999", "number too large"),
            ("99999999TiB", "too large"),
        ] {
            assert_eq!(
                parse_size(input),
                Err(ParseSizeError {
                    input: input.to_owned(),
                    reason
                }),
                "{input}"
            );
        }
    }

    #[test]
    fn sizes_print_as_they_parse() {
        for (bytes, text) in [
            (50 << 30, "50GiB"),
            (1536 << 20, "1536MiB"),
            (1000, "1000B"),
            (1 << 40, "1TiB"),
        ] {
            assert_eq!(format_size(bytes), text);
            assert_eq!(parse_size(text), Ok(bytes));
        }
        assert_eq!(format_size(0), "0B");
    }
}
