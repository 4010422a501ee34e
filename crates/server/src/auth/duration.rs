//! Human token lifetimes for `garret token create --validity`.

use std::time::Duration;

/// Why a lifetime string was refused; kept apart from [`super::AuthError`]
/// because it is a CLI parsing error with no HTTP meaning.
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
}
