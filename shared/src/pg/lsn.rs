//! PostgreSQL log sequence numbers, parsed from their text form (`16/B374D848`)
//! so that no numeric SQL type (and no decimal crate) is needed on the wire.

use std::fmt;
use std::str::FromStr;

use super::PgError;

/// A WAL position. Ordered like PostgreSQL orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Bytes of WAL from `other` up to `self` (zero if `other` is ahead).
    pub fn bytes_after(self, other: Lsn) -> u64 {
        self.0.saturating_sub(other.0)
    }
}

impl FromStr for Lsn {
    type Err = PgError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PgError::BadLsn(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_postgres_text_form() {
        let cases = [
            ("0/0", Some(0u64)),
            ("0/3000148", Some(0x0300_0148)),
            ("16/B374D848", Some((0x16 << 32) | 0xB374_D848)),
            ("FFFFFFFF/FFFFFFFF", Some(u64::MAX)),
            ("", None),
            ("0", None),
            ("/1", None),
            ("1/", None),
            ("G/0", None),
            ("1/123456789", None),
        ];
        for (text, want) in cases {
            let got = text.parse::<Lsn>().ok().map(|l| l.0);
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn bytes_after_saturates() {
        assert_eq!(Lsn(10).bytes_after(Lsn(4)), 6);
        assert_eq!(Lsn(4).bytes_after(Lsn(10)), 0);
    }

    proptest! {
        #[test]
        fn display_round_trips(v in any::<u64>()) {
            let text = Lsn(v).to_string();
            prop_assert_eq!(text.parse::<Lsn>().ok(), Some(Lsn(v)));
        }

        #[test]
        fn order_matches_numeric_order(a in any::<u64>(), b in any::<u64>()) {
            let pa: Lsn = Lsn(a).to_string().parse().unwrap();
            let pb: Lsn = Lsn(b).to_string().parse().unwrap();
            prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
        }
    }
}
