//! Instants (`google.protobuf.Timestamp`) and calendar dates (`YYYY-MM-DD`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ValidationError;
use crate::pb::Timestamp;

/// Earliest instant accepted anywhere: 2000-01-01T00:00:00Z.
const MIN_SECONDS: i64 = 946_684_800;
/// Latest instant accepted anywhere: 9999-12-31T23:59:59Z.
const MAX_SECONDS: i64 = 253_402_300_799;

/// A `SystemTime` as a protobuf `Timestamp`.
pub fn to_timestamp(at: SystemTime) -> Timestamp {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since.subsec_nanos()).unwrap_or(0),
    }
}

/// A protobuf `Timestamp` as a `SystemTime`, checked to lie between
/// 2000-01-01 and 9999-12-31 with valid nanoseconds.
pub fn from_timestamp(ts: &Timestamp) -> Result<SystemTime, ValidationError> {
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&ts.seconds) {
        return Err(ValidationError::new(
            "",
            "must be between 2000-01-01 and 9999-12-31",
        ));
    }
    let nanos = u32::try_from(ts.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| ValidationError::new("", "nanos must be in 0..1e9"))?;
    let seconds = u64::try_from(ts.seconds)
        .map_err(|_| ValidationError::new("", "must not be before 1970"))?;
    Ok(UNIX_EPOCH + Duration::new(seconds, nanos))
}

/// Milliseconds since the Unix epoch (storage encoding of instants).
pub fn to_millis(at: SystemTime) -> u64 {
    u64::try_from(
        at.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// The instant `millis` milliseconds after the Unix epoch.
pub fn from_millis(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}

/// A calendar date, checked: `YYYY-MM-DD`, a real day of the Gregorian
/// calendar. Ordered like the calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    /// Year, 1900..=9999.
    pub year: u16,
    /// Month, 1..=12.
    pub month: u8,
    /// Day of month, 1..=31 (checked against the month).
    pub day: u8,
}

impl Date {
    /// Parses `YYYY-MM-DD`.
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        const RULE: &str = "must be a calendar date YYYY-MM-DD";
        let bytes = value.as_bytes();
        if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
            return Err(ValidationError::new("", RULE));
        }
        let number = |range: std::ops::Range<usize>| -> Result<u16, ValidationError> {
            let part = &value[range];
            if !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ValidationError::new("", RULE));
            }
            part.parse().map_err(|_| ValidationError::new("", RULE))
        };
        let year = number(0..4)?;
        let month = u8::try_from(number(5..7)?).map_err(|_| ValidationError::new("", RULE))?;
        let day = u8::try_from(number(8..10)?).map_err(|_| ValidationError::new("", RULE))?;
        if !(1900..=9999).contains(&year)
            || !(1..=12).contains(&month)
            || day == 0
            || day > days_in_month(year, month)
        {
            return Err(ValidationError::new("", RULE));
        }
        Ok(Self { year, month, day })
    }

    /// The date of an instant (UTC).
    pub fn of(at: SystemTime) -> Self {
        let days = at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() / 86_400;
        civil_from_days(i64::try_from(days).unwrap_or(0))
    }
}

impl std::fmt::Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

fn days_in_month(year: u16, month: u8) -> u8 {
    match month {
        2 if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 to a civil date (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> Date {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    Date {
        year: u16::try_from(year).unwrap_or(9999),
        month: u8::try_from(month).unwrap_or(1),
        day: u8::try_from(day).unwrap_or(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert!(Date::parse("2026-02-28").is_ok());
        assert!(Date::parse("2024-02-29").is_ok());
        for bad in [
            "2026-02-29",
            "2026-13-01",
            "2026-00-10",
            "26-01-01",
            "2026/01/01",
            "2026-1-01",
            "+026-01-01",
            "",
        ] {
            assert!(Date::parse(bad).is_err(), "{bad}");
        }
        assert!(Date::parse("2026-01-31").unwrap() < Date::parse("2026-02-01").unwrap());
        assert_eq!(
            Date::of(UNIX_EPOCH + Duration::from_secs(86_400 * 365)).to_string(),
            "1971-01-01"
        );
        assert_eq!(
            Date::of(from_millis(1_772_323_200_000)).to_string(),
            "2026-03-01"
        );
    }

    #[test]
    fn timestamps() {
        let now = SystemTime::now();
        let back = from_timestamp(&to_timestamp(now)).unwrap();
        assert_eq!(to_millis(back), to_millis(now));
        assert!(
            from_timestamp(&Timestamp {
                seconds: 0,
                nanos: 0
            })
            .is_err()
        );
        assert!(
            from_timestamp(&Timestamp {
                seconds: MIN_SECONDS,
                nanos: -1
            })
            .is_err()
        );
        assert!(
            from_timestamp(&Timestamp {
                seconds: i64::MAX,
                nanos: 0
            })
            .is_err()
        );
    }
}
