//! The controller's wall clock (milliseconds since the epoch, as recorded in etcd): the
//! system's, moved by however far tokio's clock has run ahead of the system's monotonic clock.
//!
//! In production the two monotonic clocks are the same clock and this is the system time. In a
//! paused runtime (a simulation) tokio's clock jumps ahead, and so does this one: the rebalance
//! delay, the push timeout, the topic release wait and a failed move target's cooldown then
//! pass in simulated time, like every timer and lease, instead of never.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn is_the_system_time_on_a_running_clock() {
        let system = rialto_protocol::meta::now_ms();
        assert!((now_ms() - system).abs() < 1_000);
    }

    #[tokio::test(start_paused = true)]
    async fn runs_with_a_paused_runtime_s_clock() {
        let before = now_ms();
        tokio::time::sleep(Duration::from_secs(600)).await;
        let advanced = now_ms() - before;
        assert!((599_000..=601_000).contains(&advanced), "{advanced}");
    }
}
