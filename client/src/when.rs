//! Times for people: Unix seconds shown as local date and time (text output only; JSON keeps
//! Unix seconds).

/// A Unix time as local date and time, `2026-12-04 21:30`; the time alone for today.
pub fn local_time(unix: u64) -> String {
    let zone = jiff::tz::TimeZone::system();
    let Ok(at) = jiff::Timestamp::from_second(i64::try_from(unix).unwrap_or(i64::MAX)) else {
        return unix.to_string();
    };
    let at = at.to_zoned(zone.clone());
    let today = jiff::Timestamp::now().to_zoned(zone).date();
    if at.date() == today {
        at.strftime("%H:%M").to_string()
    } else {
        at.strftime("%Y-%m-%d %H:%M").to_string()
    }
}

/// How far ahead `expires` is, and when, for people: "in 30 days (2027-01-03 21:30)".
pub fn describe_expiry(expires: u64, now: u64) -> String {
    let secs = expires.saturating_sub(now);
    let (n, unit) = match secs {
        s if s >= 2 * 86_400 => (s / 86_400, "days"),
        s if s >= 2 * 3_600 => (s / 3_600, "hours"),
        s if s >= 120 => (s / 60, "minutes"),
        s => (s, "seconds"),
    };
    format!("in {n} {unit}, {}", local_time(expires))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_local_and_readable() {
        let now = jiff::Timestamp::now().as_second() as u64;
        // Today: the time of day only.
        let today = local_time(now);
        assert_eq!(today.len(), 5, "{today}");
        assert_eq!(today.as_bytes()[2], b':', "{today}");
        // Another day: date and time.
        let long_ago = local_time(86_400 * 400);
        assert_eq!(long_ago.len(), 16, "{long_ago}");
        assert!(long_ago.starts_with("1971-"), "{long_ago}");
        let expiry = describe_expiry(now + 30 * 86_400, now);
        assert!(expiry.starts_with("in 30 days, "), "{expiry}");
        assert!(!expiry.contains("unix"), "{expiry}");
    }
}
