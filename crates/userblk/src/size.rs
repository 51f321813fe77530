//! Human sizes: `4096`, `512K`, `1G`, `1GiB`, `2T`. Binary units throughout, as block tools use them.

use crate::{Error, Result};

/// The largest size anything here can have: file offsets (`loff_t`) are
/// signed 64-bit, so no device or file goes past 8 EiB less a byte.
pub const MAX: u64 = i64::MAX as u64;

/// Parse a byte size with an optional binary suffix (K, M, G, T, P, E, each
/// optionally followed by `iB` or `B`), up to [`MAX`].
///
/// ```
/// assert_eq!(userblk::size::parse("1G").unwrap(), 1 << 30);
/// assert_eq!(userblk::size::parse("512KiB").unwrap(), 512 << 10);
/// assert_eq!(userblk::size::parse("4096").unwrap(), 4096);
/// assert!(userblk::size::parse("12Q").is_err());
/// ```
pub fn parse(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(Error::invalid(format!(
            "invalid size '{s}': expected a number with an optional K/M/G/T/P/E suffix"
        )));
    }
    let too_large = || {
        Error::invalid(format!(
            "size '{s}' is larger than the largest device, 8E less a byte"
        ))
    };
    let n: u64 = num.parse().map_err(|_| too_large())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => {
            return Err(Error::invalid(format!(
                "invalid size '{s}': unknown unit '{unit}' (use K, M, G, T, P or E)"
            )))
        }
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v <= MAX)
        .ok_or_else(too_large)
}

/// Format a byte count the short way (`1G`, `512M`, `1536K`, `4097`): exact, never rounded.
///
/// ```
/// assert_eq!(userblk::size::format(1 << 30), "1G");
/// assert_eq!(userblk::size::format(4097), "4097");
/// ```
pub fn format(n: u64) -> String {
    for (shift, unit) in [
        (60, "E"),
        (50, "P"),
        (40, "T"),
        (30, "G"),
        (20, "M"),
        (10, "K"),
    ] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("0").ok(), Some(0));
        assert_eq!(parse("1k").ok(), Some(1024));
        assert_eq!(parse("3M").ok(), Some(3 << 20));
        assert_eq!(parse("250GiB").ok(), Some(250 << 30));
        assert_eq!(parse("1T").ok(), Some(1 << 40));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "G",
            "-1",
            "1.5G",
            "1X",
            "99999999999999999999",
            "16777216P",
            "16383P",
            "8E",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("7E").ok(), Some(7 << 60));
        assert_eq!(parse(&MAX.to_string()).ok(), Some(MAX));
        assert_eq!(
            parse("16383P").unwrap_err().to_string(),
            "size '16383P' is larger than the largest device, 8E less a byte"
        );
    }

    #[test]
    fn formats_round_trip() {
        for n in [1u64, 4096, 1 << 20, 3 << 30, 5 << 40, 12345] {
            assert_eq!(parse(&format(n)).ok(), Some(n));
        }
    }
}
