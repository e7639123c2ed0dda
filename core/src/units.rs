//! Byte sizes as people write them (`80GiB`, `24GB`) and as Gantry prints them (`41.7 GiB`).

use crate::error::{Error, Result};

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;
/// One TiB.
pub const TIB: u64 = 1 << 40;

/// Formats bytes with a binary unit and one decimal: `41.7 GiB`, `512.0 MiB`, `980 B`.
pub fn format_bytes(bytes: u64) -> String {
    let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (size, name) in units {
        if bytes >= size {
            return format!("{:.1} {name}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

/// Formats a count with thousands separators: `70,553,706,496`.
pub fn format_count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Formats a parameter count the way model cards do: `135M`, `8.0B`, `70.6B`.
pub fn format_params(n: u64) -> String {
    // 999,885,952 reads as 1.0B, not 1000M.
    if n >= 999_500_000 {
        format!("{:.1}B", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.0}M", n as f64 / 1e6)
    } else {
        format_count(n)
    }
}

/// Formats a token count compactly: `8K`, `128K`, `2K`, `1000`.
pub fn format_tokens(n: u64) -> String {
    if n >= 1024 && n.is_multiple_of(1024) { format!("{}K", n / 1024) } else { n.to_string() }
}

/// Parses a byte size with a unit: `80GiB`, `24GB`, `512MiB`, `1.5TiB`, `16G` (G = GiB).
///
/// Decimal units (`GB`, `MB`, `TB`) are powers of ten, binary ones (`GiB`, `G`, …) powers of
/// two. A bare number is refused: "80" could be GB or GiB, and 7% matters when packing GPUs.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let bad = |problem: &str| Error::InvalidInput { what: format!("size `{text}`"), problem: problem.to_string() };
    if num.is_empty() {
        return Err(bad("expected a number followed by a unit, like 80GiB or 24GB"));
    }
    let value: f64 = num.parse().map_err(|_| bad("the number is not valid"))?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => return Err(bad("add a unit (GiB, GB, MiB, MB, TiB, TB)")),
        "b" => 1.0,
        "kib" | "k" => KIB as f64,
        "mib" | "m" => MIB as f64,
        "gib" | "g" => GIB as f64,
        "tib" | "t" => TIB as f64,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(bad(&format!("unknown unit `{other}` (use GiB, GB, MiB, MB, TiB, TB)")));
        }
    };
    let bytes = value * multiplier;
    // 1 PiB per device is far beyond any accelerator or host that exists.
    if !bytes.is_finite() || bytes < 1.0 || bytes > (1u64 << 50) as f64 {
        return Err(bad("must be between 1 byte and 1 PiB"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a token count: `8192`, `8K` (8,192), `128k` (131,072), `1M` (1,048,576).
///
/// K and M are binary, as context lengths are (`128K` contexts are 131,072 tokens).
pub fn parse_tokens(text: &str) -> Result<u64> {
    let t = text.trim();
    let bad = |problem: &str| Error::InvalidInput { what: format!("token count `{text}`"), problem: problem.into() };
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1024),
        Some((i, 'm' | 'M')) => (&t[..i], 1024 * 1024),
        _ => (t, 1),
    };
    let n: u64 = digits.trim().parse().map_err(|_| bad("expected a number like 8192, 8K or 128K"))?;
    let n = n.checked_mul(mult).ok_or_else(|| bad("too large"))?;
    if n == 0 || n > 1 << 24 {
        return Err(bad("must be between 1 and 16M tokens"));
    }
    Ok(n)
}

/// Parses a parameter count: `13B`, `500M`, `7.5b`, or a plain number.
pub fn parse_params(text: &str) -> Result<u64> {
    let t = text.trim();
    let bad =
        |problem: &str| Error::InvalidInput { what: format!("parameter count `{text}`"), problem: problem.into() };
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 'b' | 'B')) => (&t[..i], 1e9),
        Some((i, 'm' | 'M')) => (&t[..i], 1e6),
        _ => (t, 1.0),
    };
    let n: f64 = digits.trim().parse().map_err(|_| bad("expected a number like 13B or 500M"))?;
    let n = n * mult;
    if !n.is_finite() || !(1.0..=1e13).contains(&n) {
        return Err(bad("must be between 1 and 10T"));
    }
    Ok(n.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_binary_sizes_with_one_decimal() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(512 * MIB), "512.0 MiB");
        assert_eq!(format_bytes(80 * GIB), "80.0 GiB");
        assert_eq!(format_bytes(41 * GIB + 700 * MIB), "41.7 GiB");
    }

    #[test]
    fn formats_counts_and_params() {
        assert_eq!(format_count(70_553_706_496), "70,553,706,496");
        assert_eq!(format_count(999), "999");
        assert_eq!(format_count(1000), "1,000");
        assert_eq!(format_params(134_515_008), "135M");
        assert_eq!(format_params(8_030_261_248), "8.0B");
        assert_eq!(format_params(999_885_952), "1.0B");
        assert_eq!(format_tokens(131_072), "128K");
        assert_eq!(format_tokens(1000), "1000");
    }

    #[test]
    fn parses_sizes_in_every_unit() {
        let cases = [
            ("80GiB", 80 * GIB),
            ("80gib", 80 * GIB),
            ("16G", 16 * GIB),
            ("24GB", 24_000_000_000),
            ("512MiB", 512 * MIB),
            ("1.5TiB", 3 * TIB / 2),
            (" 8 GiB ", 8 * GIB),
        ];
        for (text, want) in cases {
            assert_eq!(parse_bytes(text).unwrap(), want, "{text}");
        }
    }

    #[test]
    fn parses_token_and_parameter_counts() {
        assert_eq!(parse_tokens("8192").unwrap(), 8192);
        assert_eq!(parse_tokens("8K").unwrap(), 8192);
        assert_eq!(parse_tokens("128k").unwrap(), 131_072);
        assert_eq!(parse_tokens("1M").unwrap(), 1 << 20);
        for bad in ["0", "-5", "8Q", "99999999999", "K"] {
            assert!(parse_tokens(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_params("13B").unwrap(), 13_000_000_000);
        assert_eq!(parse_params("7.5b").unwrap(), 7_500_000_000);
        assert_eq!(parse_params("500M").unwrap(), 500_000_000);
        assert!(parse_params("lots").is_err());
    }

    #[test]
    fn refuses_sizes_without_unit_or_absurd() {
        for text in ["80", "GiB", "-1GiB", "1.2.3GiB", "80 parsecs", "2048PiB", "0GiB", ""] {
            assert!(parse_bytes(text).is_err(), "{text} should be refused");
        }
        let err = parse_bytes("80").unwrap_err().to_string();
        assert!(err.contains("add a unit"), "{err}");
    }
}
