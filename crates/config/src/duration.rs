//! Go-style duration strings ("90s", "1m", "1h30m", "250ms") plus "d" for days.

use std::time::Duration;

/// Parses a Go duration string, with `d` (24h) added. A bare number is not accepted here;
/// callers that allow plain seconds handle integers themselves.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    let mut total_nanos: f64 = 0.0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        if start == i {
            return Err(format!(
                "invalid duration {s:?}: expected a number at {:?}",
                &s[start..]
            ));
        }
        let num: f64 = s[start..i]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: bad number {:?}", &s[start..i]))?;
        let ustart = i;
        while i < bytes.len() && !(bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            i += 1;
        }
        let unit = &s[ustart..i];
        let mult: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "d" => 86400e9,
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: missing unit (use ms, s, m, h or d, e.g. \"30s\")"
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (use ns, us, ms, s, m, h or d)"
                ))
            }
        };
        total_nanos += num * mult;
    }
    if !total_nanos.is_finite() || total_nanos > 1e20 {
        return Err(format!("invalid duration {s:?}: too large"));
    }
    Ok(Duration::from_nanos(total_nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_formats() {
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("2d").unwrap(), Duration::from_secs(172800));
        assert_eq!(parse("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("").is_err());
        assert!(parse("10").is_err());
        assert!(parse("5x").is_err());
        assert!(parse("m").is_err());
        assert!(parse("1e400h").is_err());
    }
}
