//! Parsers for the string forms the spec uses: Kubernetes quantities (`2Gi`) and Go durations (`5m`).
//! The apiserver checks their shape (CEL `isQuantity`, a pattern); these give the values.

use std::time::Duration;

/// Parse a Kubernetes quantity into a whole number of units (bytes for memory), rounding up.
/// Accepts binary (`Ki`..`Ei`), decimal (`k`..`E`, `m`) suffixes and exponents (`1e9`).
pub fn parse_quantity(s: &str) -> Result<u128, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty quantity".into());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.starts_with('-') {
        return Err(format!("quantity {s:?} is negative"));
    }
    let num = num.strip_prefix('+').unwrap_or(num);
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return Err(format!("quantity {s:?}: {num:?} is not a number"));
    }
    // Value = mantissa * 10^(exp10) * 2^(exp2), computed exactly in u128 where it fits.
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits
            .parse()
            .map_err(|_| format!("quantity {s:?} is too large"))?
    };
    let mut exp10: i64 = -(frac_part.len() as i64);
    let mut exp2: u32 = 0;
    match suffix {
        "" => {}
        "Ki" => exp2 = 10,
        "Mi" => exp2 = 20,
        "Gi" => exp2 = 30,
        "Ti" => exp2 = 40,
        "Pi" => exp2 = 50,
        "Ei" => exp2 = 60,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        other => {
            let exp = other
                .strip_prefix(['e', 'E'])
                .and_then(|e| e.parse::<i64>().ok())
                .ok_or_else(|| {
                    format!("quantity {s:?}: unknown suffix {other:?} (use Ki, Mi, Gi, Ti, k, M, G, T or an exponent like e9)")
                })?;
            exp10 += exp;
        }
    }
    let too_large = || format!("quantity {s:?} is too large");
    let mut v = mantissa.checked_mul(1u128 << exp2).ok_or_else(too_large)?;
    if exp10 >= 0 {
        let p = 10u128.checked_pow(exp10 as u32).ok_or_else(too_large)?;
        v = v.checked_mul(p).ok_or_else(too_large)?;
    } else {
        let p = 10u128.checked_pow((-exp10) as u32).unwrap_or(u128::MAX);
        v = v.div_ceil(p);
    }
    Ok(v)
}

/// Parse a Go duration (`300ms`, `30s`, `5m`, `1h30m`, `1.5h`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = t;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {s:?}: {rest:?} has no unit (use ms, s, m or h)"))?;
        if n == 0 {
            return Err(format!("duration {s:?}: expected a number at {rest:?}"));
        }
        let value: f64 = rest[..n]
            .parse()
            .map_err(|_| format!("duration {s:?}: {:?} is not a number", &rest[..n]))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "duration {s:?}: unknown unit {other:?} (use ns, us, ms, s, m or h)"
                ))
            }
        };
        total += value * secs;
        rest = &rest[u..];
    }
    if !total.is_finite() || total > 1e12 {
        return Err(format!("duration {s:?} is too long"));
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        let cases: &[(&str, Result<u128, &str>)] = &[
            ("2Gi", Ok(2 << 30)),
            ("512Mi", Ok(512 << 20)),
            ("1.5Gi", Ok(3 << 29)),
            ("1G", Ok(1_000_000_000)),
            ("1e9", Ok(1_000_000_000)),
            ("0", Ok(0)),
            ("100", Ok(100)),
            ("1500m", Ok(2)),
            ("+1k", Ok(1000)),
            ("-1Gi", Err("negative")),
            ("2GB", Err("unknown suffix")),
            ("Gi", Err("not a number")),
            ("", Err("empty")),
            ("1.2.3", Err("not a number")),
            (
                "99999999999999999999999999999999999999999Ei",
                Err("too large"),
            ),
        ];
        for (input, want) in cases {
            match (parse_quantity(input), want) {
                (Ok(v), Ok(w)) => assert_eq!(v, *w, "{input}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{input}: {e}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn durations() {
        let cases: &[(&str, Result<f64, &str>)] = &[
            ("30s", Ok(30.0)),
            ("5m", Ok(300.0)),
            ("1h30m", Ok(5400.0)),
            ("1.5h", Ok(5400.0)),
            ("250ms", Ok(0.25)),
            ("0", Ok(0.0)),
            ("5", Err("no unit")),
            ("5d", Err("unknown unit")),
            ("m", Err("expected a number")),
            ("", Err("empty")),
        ];
        for (input, want) in cases {
            match (parse_duration(input), want) {
                (Ok(v), Ok(w)) => assert!((v.as_secs_f64() - w).abs() < 1e-9, "{input}: {v:?}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{input}: {e}"),
                (got, want) => panic!("{input}: got {got:?}, want {want:?}"),
            }
        }
    }
}
