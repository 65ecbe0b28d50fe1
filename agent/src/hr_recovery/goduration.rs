//! Go `time.Duration` strings (`5m`, `1h30m`, `90s`, `1.5h`, `300ms`) as Flux writes `spec.timeout`.

use std::time::Duration;

/// Parse a Go duration; `None` for anything malformed or negative.
pub fn parse(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * mult;
    }
    if !total.is_finite() || total > 1e12 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases = [
            ("5m", Some(300.0)),
            ("1h30m", Some(5400.0)),
            ("90s", Some(90.0)),
            ("1.5h", Some(5400.0)),
            ("300ms", Some(0.3)),
            ("0", Some(0.0)),
            ("", None),
            ("5", None),
            ("m", None),
            ("5x", None),
            ("-5m", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse(s).map(|d| d.as_secs_f64()), want, "{s}");
        }
    }
}
