//! `grpc-timeout`: parsed from the client, forwarded with the time left.

use std::time::Duration;

use http::HeaderValue;

/// Parses `grpc-timeout` (up to 8 digits and a unit: H M S m u n).
pub fn parse(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Encodes `left` in the finest unit that fits in 8 digits.
pub fn encode(left: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let micros = left.as_micros();
    let text = if micros <= MAX {
        format!("{}u", micros.max(1))
    } else if left.as_millis() <= MAX {
        format!("{}m", left.as_millis())
    } else if u128::from(left.as_secs()) <= MAX {
        format!("{}S", left.as_secs())
    } else {
        format!("{}H", (left.as_secs() / 3600).min(MAX as u64))
    };
    HeaderValue::from_str(&text).expect("ascii digits and a unit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        for (s, d) in [
            ("100m", Duration::from_millis(100)),
            ("5S", Duration::from_secs(5)),
            ("2H", Duration::from_secs(7200)),
            ("30u", Duration::from_micros(30)),
        ] {
            assert_eq!(parse(&HeaderValue::from_static(s)), Some(d));
        }
        for bad in ["", "m", "12", "123456789m", "5x", "-1S"] {
            assert_eq!(parse(&HeaderValue::from_str(bad).unwrap()), None, "{bad}");
        }
        assert_eq!(encode(Duration::from_millis(1500)), "1500000u");
        assert_eq!(
            parse(&encode(Duration::from_secs(400))).unwrap(),
            Duration::from_secs(400)
        );
        assert_eq!(encode(Duration::ZERO), "1u");
    }
}
