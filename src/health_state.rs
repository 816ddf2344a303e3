//! Health rules, pure: the active check's rise/fall state machine and the
//! slow-start ramp. No clock of their own, no I/O: the health checker task
//! (`health`) feeds them results, the registry asks the ramp with `now`.

use std::time::Duration;

/// The active check's view of one backend (a pure state machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckState {
    pub up: bool,
    /// Results in a row that disagree with `up`.
    streak: u32,
}

impl Default for CheckState {
    fn default() -> Self {
        // Backends start up: sluice does not refuse traffic while it looks.
        Self {
            up: true,
            streak: 0,
        }
    }
}

impl CheckState {
    /// A backend the check last saw `up` (after a reload).
    pub fn starting(up: bool) -> Self {
        Self { up, streak: 0 }
    }

    /// Records one result; returns the new state when it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// Share of its weight a backend gets `elapsed` into a slow start of
/// `ramp`: from near zero up to all of it, linearly.
pub fn slow_start_factor(elapsed: Duration, ramp: Duration) -> f64 {
    if ramp.is_zero() || elapsed >= ramp {
        return 1.0;
    }
    (elapsed.as_secs_f64() / ramp.as_secs_f64()).max(0.02)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut s = CheckState::default();
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(true, 2, 3), None, "a success resets the streak");
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), Some(false));
        assert!(!s.up);
        assert_eq!(s.record(true, 2, 3), None);
        assert_eq!(s.record(true, 2, 3), Some(true));
        assert!(s.up);
    }

    #[test]
    fn slow_start_ramps_linearly_from_near_zero() {
        let ramp = Duration::from_secs(30);
        assert_eq!(slow_start_factor(Duration::ZERO, ramp), 0.02);
        assert_eq!(slow_start_factor(Duration::from_secs(15), ramp), 0.5);
        assert_eq!(slow_start_factor(Duration::from_secs(30), ramp), 1.0);
        assert_eq!(
            slow_start_factor(Duration::from_secs(1), Duration::ZERO),
            1.0
        );
    }
}
