//! Times and durations as people write them: `90d`, `12h 30m`, `2026-12-31T00:00:00Z`.
//!
//! Instants are whole seconds since the Unix epoch (`i64`), as the store keeps them; they are
//! shown in RFC 3339 UTC. Parsing and formatting are humantime's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// Now, in seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Now, rounded up to the next whole second: what a delay counts from, so that a time `after`
/// it is at least `after` away (with [`now`], a delay of 1s could come due a moment later, at
/// the next whole second).
pub fn now_ceil() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
        let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        secs.saturating_add(i64::from(d.subsec_nanos() > 0))
    })
}

/// A duration such as `7d`, `90days`, `12h 30m`, `45s` (humantime's syntax), in whole seconds.
///
/// # Errors
/// [`Error::InvalidInput`] naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        Error::InvalidInput(format!(
            "`{}` is not a duration ({e}): write e.g. 30s, 15m, 12h, 7d, 90days or `1d 12h`",
            text.escape_default()
        ))
    })?;
    Ok(Duration::from_secs(d.as_secs()))
}

/// A duration in seconds as `i64` (store form), refusing ones past the year 292 billion.
///
/// # Errors
/// [`Error::InvalidInput`].
pub fn duration_secs(d: Duration) -> Result<i64> {
    i64::try_from(d.as_secs())
        .map_err(|_| Error::InvalidInput(format!("the duration {d:?} is too long")))
}

/// The last instant keyhold keeps: 9999-12-31T23:59:59Z, the last one RFC 3339 can write.
pub const LAST_INSTANT: i64 = 253_402_300_799;

/// `at` if it is an instant keyhold can keep and write (the epoch to [`LAST_INSTANT`]).
///
/// # Errors
/// [`Error::InvalidInput`] naming `what` and the range.
pub fn check_instant(at: i64, what: &str) -> Result<i64> {
    if (0..=LAST_INSTANT).contains(&at) {
        Ok(at)
    } else {
        Err(Error::InvalidInput(format!(
            "{what} must be between 1970-01-01T00:00:00Z and 9999-12-31T23:59:59Z"
        )))
    }
}

/// An instant: an RFC 3339 UTC time (`2026-12-31T00:00:00Z`) or a duration from `now` (`+7d`).
///
/// # Errors
/// [`Error::InvalidInput`] naming the accepted forms.
pub fn parse_instant(text: &str, now: i64) -> Result<i64> {
    let text = text.trim();
    if let Some(rest) = text.strip_prefix('+') {
        return now
            .checked_add(duration_secs(parse_duration(rest)?)?)
            .filter(|at| *at <= LAST_INSTANT)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "`{text}` is too far in the future: the last time keyhold keeps is \
                     9999-12-31T23:59:59Z"
                ))
            });
    }
    let at = humantime::parse_rfc3339_weak(text).map_err(|e| {
        Error::InvalidInput(format!(
            "`{}` is not a time ({e}): write an RFC 3339 UTC time such as \
             2026-12-31T00:00:00Z, or +DURATION (e.g. +7d) from now",
            text.escape_default()
        ))
    })?;
    match at.duration_since(UNIX_EPOCH) {
        Ok(d) => duration_secs(d),
        Err(_) => Err(Error::InvalidInput(format!(
            "`{text}` is before 1970: give a later time"
        ))),
    }
}

/// `secs` since the epoch as an RFC 3339 UTC timestamp (`2026-11-23T14:19:21Z`); an instant
/// RFC 3339 cannot write (before 1970, after 9999) as `@SECS`, never a panic.
pub fn format_utc(secs: i64) -> String {
    if !(0..=LAST_INSTANT).contains(&secs) {
        return format!("@{secs}");
    }
    let at = UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs());
    let mut text = String::new();
    match std::fmt::Write::write_fmt(
        &mut text,
        format_args!("{}", humantime::format_rfc3339_seconds(at)),
    ) {
        Ok(()) => text,
        Err(_) => format!("@{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review: a time past 9999 made `format_utc` panic (humantime's Display fails there), after
    /// a key with it was committed. Such times are refused when read, and written as `@SECS`.
    #[test]
    fn times_past_9999_are_refused_and_never_panic_when_written() {
        assert_eq!(format_utc(LAST_INSTANT), "9999-12-31T23:59:59Z");
        assert_eq!(format_utc(LAST_INSTANT + 1), "@253402300800");
        assert_eq!(format_utc(i64::MAX), format!("@{}", i64::MAX));
        assert_eq!(format_utc(-1), "@-1");
        assert!(parse_instant("+10000y", now()).is_err());
        assert_eq!(
            parse_instant("9999-12-31T23:59:59Z", 0).unwrap(),
            LAST_INSTANT
        );
        assert!(check_instant(LAST_INSTANT + 1, "`at`").is_err());
        assert!(check_instant(-5, "`at`").is_err());
        assert_eq!(check_instant(0, "`at`").unwrap(), 0);
    }

    #[test]
    fn formats_utc() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_795_443_561), "2026-11-23T14:19:21Z");
    }

    #[test]
    fn parses_durations_and_instants() {
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_instant("+1h", 100).unwrap(), 3700);
        assert_eq!(
            parse_instant("2026-11-23T14:19:21Z", 0).unwrap(),
            1_795_443_561
        );
        for bad in ["", "7", "seven days", "d7"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.to_string().contains("is not a duration"), "{bad}: {e}");
        }
        let e = parse_instant("tomorrow", 0).unwrap_err();
        assert!(e.to_string().contains("is not a time"), "{e}");
        let e = parse_instant("1969-12-31T00:00:00Z", 0).unwrap_err();
        assert!(e.to_string().contains("is not a time"), "{e}");
    }
}
