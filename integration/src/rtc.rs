//! Minimal MC146818 CMOS RTC on ports 0x70/0x71: the current UTC time in
//! BCD, 24-hour mode, never "update in progress". Without it Linux spends
//! seconds polling an all-ones status register at boot.

use std::time::{SystemTime, UNIX_EPOCH};

/// Index port.
pub const RTC_INDEX: u16 = 0x70;
/// Data port.
pub const RTC_DATA: u16 = 0x71;

/// CMOS RTC with a 128-byte register file for everything but the clock.
pub struct Rtc {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// (year, month, day) of the civil date `days` after 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Rtc {
    /// A new RTC reading the host clock.
    pub fn new() -> Self {
        let mut nvram = [0u8; 128];
        nvram[0x0a] = 0x26; // 32.768 kHz time base, 1024 Hz rate, UIP clear
        nvram[0x0b] = 0x02; // 24-hour mode, BCD, no interrupts
        nvram[0x0d] = 0x80; // valid RAM and time
        Rtc { index: 0, nvram }
    }

    /// Register `reg` at UNIX time `secs`.
    pub fn register_at(&self, reg: u8, secs: u64) -> u8 {
        let days = (secs / 86_400) as i64;
        let sod = secs % 86_400;
        let (y, m, d) = civil_from_days(days);
        match reg {
            0x00 => bcd(sod % 60),
            0x02 => bcd(sod / 60 % 60),
            0x04 => bcd(sod / 3600),
            0x06 => bcd(((days + 4).rem_euclid(7) + 1) as u64),
            0x07 => bcd(u64::from(d)),
            0x08 => bcd(u64::from(m)),
            0x09 => bcd(y.rem_euclid(100) as u64),
            0x32 => bcd(y.div_euclid(100) as u64),
            0x0c => 0, // no interrupt flags
            r => self.nvram[usize::from(r & 0x7f)],
        }
    }

    /// Handles a one-byte IN.
    pub fn read(&mut self, port: u16) -> u8 {
        if port == RTC_INDEX {
            return 0xff;
        }
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.register_at(self.index, secs)
    }

    /// Handles a one-byte OUT. Bit 7 of the index is the NMI mask.
    pub fn write(&mut self, port: u16, v: u8) {
        if port == RTC_INDEX {
            self.index = v & 0x7f;
        } else {
            match self.index {
                // Clock registers and status registers C/D are read-only here.
                0x00..=0x09 | 0x0c | 0x0d | 0x32 => {}
                // Keep UIP clear.
                0x0a => self.nvram[0x0a] = v & 0x7f,
                i => self.nvram[usize::from(i)] = v,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
    }

    #[test]
    fn registers() {
        let mut r = Rtc::new();
        // 2026-11-25 13:14:15 UTC, a Wednesday.
        let t = 20_782 * 86_400 + 13 * 3600 + 14 * 60 + 15;
        assert_eq!(civil_from_days(20_782), (2026, 11, 25));
        let g = |reg| r.register_at(reg, t);
        assert_eq!(
            [g(0), g(2), g(4), g(6), g(7), g(8), g(9), g(0x32)],
            [0x15, 0x14, 0x13, 0x04, 0x25, 0x11, 0x26, 0x20]
        );
        assert_eq!(g(0x0a) & 0x80, 0, "never update-in-progress");
        assert_eq!(g(0x0d), 0x80);
        r.write(RTC_INDEX, 0x8a);
        r.write(RTC_DATA, 0xa6);
        assert_eq!(r.read(RTC_DATA), 0x26);
        r.write(RTC_INDEX, 0x20);
        r.write(RTC_DATA, 0x5a);
        assert_eq!(r.read(RTC_DATA), 0x5a);
    }
}
