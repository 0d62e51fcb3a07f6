//! Hybrid logical clock: wall milliseconds plus a logical counter, packed in
//! one `u64` so it orders as an integer and stores as one column.

use std::fmt;

/// Bits of the packed value that hold the logical counter.
const LOGICAL_BITS: u32 = 16;
const LOGICAL_MAX: u64 = (1 << LOGICAL_BITS) - 1;

/// A hybrid logical clock timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

impl Hlc {
    pub fn new(wall_ms: u64, logical: u64) -> Self {
        Hlc((wall_ms << LOGICAL_BITS) | (logical & LOGICAL_MAX))
    }
    pub fn from_packed(v: u64) -> Self {
        Hlc(v)
    }
    pub fn packed(self) -> u64 {
        self.0
    }
    pub fn wall_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
    pub fn logical(self) -> u64 {
        self.0 & LOGICAL_MAX
    }

    /// Next timestamp for a local event: never goes backwards, even when the
    /// wall clock does.
    pub fn tick(self, now_ms: u64) -> Hlc {
        if now_ms > self.wall_ms() {
            Hlc::new(now_ms, 0)
        } else if self.logical() < LOGICAL_MAX {
            Hlc(self.0 + 1)
        } else {
            // Counter exhausted within one millisecond: borrow the next one.
            Hlc::new(self.wall_ms() + 1, 0)
        }
    }

    /// Next timestamp after receiving `remote`: greater than both.
    pub fn receive(self, remote: Hlc, now_ms: u64) -> Hlc {
        let base = self.max(remote);
        base.tick(now_ms)
    }

    /// Like [`Hlc::receive`], but a remote timestamp more than `drift_ms_max`
    /// ahead of `now_ms` (a peer with a broken clock) does not drag this
    /// clock into the future; the local clock just ticks.
    pub fn receive_bounded(self, remote: Hlc, now_ms: u64, drift_ms_max: u64) -> Hlc {
        if remote.wall_ms() > now_ms.saturating_add(drift_ms_max) {
            self.tick(now_ms)
        } else {
            self.receive(remote, now_ms)
        }
    }

    /// Parses the text form written by `Display` (`wall.logical`).
    pub fn parse(s: &str) -> Option<Hlc> {
        let (w, l) = s.split_once('.')?;
        let wall = w.parse::<u64>().ok()?;
        let logical = l.parse::<u64>().ok()?;
        (logical <= LOGICAL_MAX).then(|| Hlc::new(wall, logical))
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:05}", self.wall_ms(), self.logical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_is_monotonic_when_clock_goes_back() {
        let a = Hlc::new(1000, 0);
        let b = a.tick(900);
        assert!(b > a);
        assert_eq!(b.wall_ms(), 1000);
        let c = b.tick(2000);
        assert_eq!(c, Hlc::new(2000, 0));
    }

    #[test]
    fn counter_overflow_borrows_next_ms() {
        let a = Hlc::new(5, LOGICAL_MAX);
        assert_eq!(a.tick(5), Hlc::new(6, 0));
    }

    #[test]
    fn receive_exceeds_both() {
        let local = Hlc::new(10, 3);
        let remote = Hlc::new(20, 7);
        let r = local.receive(remote, 15);
        assert!(r > local && r > remote);
    }

    #[test]
    fn a_remote_clock_far_ahead_is_not_followed() {
        let local = Hlc::new(1_000, 0);
        let near = Hlc::new(1_000 + 5 * 60_000, 0);
        assert!(local.receive_bounded(near, 1_000, 3_600_000) > near);
        let far = Hlc::new(1_000 + 2 * 3_600_000, 0);
        let r = local.receive_bounded(far, 1_000, 3_600_000);
        assert!(r > local && r < far);
    }

    #[test]
    fn text_round_trip() {
        let h = Hlc::new(1_732_000_000_123, 42);
        assert_eq!(Hlc::parse(&h.to_string()), Some(h));
        assert_eq!(Hlc::parse("x"), None);
    }
}
