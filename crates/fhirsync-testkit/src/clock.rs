//! A wall clock off by a fixed amount, to give nodes skewed clocks.

use fhirsync_core::clock::{Clock, SystemClock};

#[derive(Debug, Clone, Copy)]
pub struct SkewedClock {
    pub offset_ms: i64,
}

impl Clock for SkewedClock {
    fn now_ms(&self) -> u64 {
        (SystemClock.now_ms() as i64 + self.offset_ms).max(0) as u64
    }
}
