//! The wall clock Rialto records and compares (milliseconds since the Unix epoch): the
//! controller's `created_ms` and timeouts, servers' rewind points, the memory broker's record
//! timestamps.
//!
//! It is the system time moved by however far tokio's clock has run ahead of the system's
//! monotonic clock. In production the two monotonic clocks are one and this is the system time.
//! In a paused runtime tokio's clock jumps ahead, and so does this one: the rebalance delay, the
//! push timeout and a real-time rewind then pass in simulated time, like every timer and lease,
//! instead of in the few real seconds a simulation takes. A simulation goes one step further
//! with [`simulate_on_this_thread`]: the clock starts at a fixed time and moves with tokio's
//! alone, so no real time (nor where a run starts within a millisecond) enters a comparison and
//! every run of a seed reads the same times.

use std::cell::Cell;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

thread_local! {
    /// A simulated clock: its time at `.1` on tokio's clock.
    static SIMULATED: Cell<Option<(i64, tokio::time::Instant)>> = const { Cell::new(None) };
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    if let Some((at_ms, since)) = SIMULATED.with(Cell::get) {
        return at_ms + (tokio::time::Instant::now() - since).as_millis() as i64;
    }
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let tokio_now = tokio::time::Instant::now().into_std();
    let os_now = Instant::now();
    let ahead_ms = if tokio_now >= os_now {
        (tokio_now - os_now).as_millis() as i64
    } else {
        -((os_now - tokio_now).as_millis() as i64)
    };
    wall + ahead_ms
}

/// Makes [`now_ms`] on this thread read `at_ms` now and move only with tokio's clock, until the
/// guard is dropped. Call it inside the runtime whose clock it is to follow.
pub fn simulate_on_this_thread(at_ms: i64) -> SimulatedClock {
    let previous = SIMULATED.with(|c| c.replace(Some((at_ms, tokio::time::Instant::now()))));
    SimulatedClock {
        previous,
        _not_send: std::marker::PhantomData,
    }
}

/// Restores the clock of this thread when dropped.
pub struct SimulatedClock {
    previous: Option<(i64, tokio::time::Instant)>,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for SimulatedClock {
    fn drop(&mut self) {
        SIMULATED.with(|c| c.set(self.previous));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn system_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    }

    #[tokio::test]
    async fn is_the_system_time_on_a_running_clock() {
        assert!((now_ms() - system_ms()).abs() < 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn runs_with_a_paused_runtime_s_clock() {
        let before = now_ms();
        tokio::time::sleep(Duration::from_secs(600)).await;
        let advanced = now_ms() - before;
        assert!((599_000..=601_000).contains(&advanced), "{advanced}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_simulated_clock_moves_with_tokio_s_alone() {
        {
            let _clock = simulate_on_this_thread(1_000_000);
            assert_eq!(now_ms(), 1_000_000);
            // Real time passing does not move it.
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(now_ms(), 1_000_000);
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            assert_eq!(now_ms(), 1_001_500);
        }
        assert!(
            (now_ms() - system_ms()).abs() > 1_000,
            "the system time moved by the paused clock's lead"
        );
    }
}
