//! Admin calls per caller, bounded: one client (a runaway script, a push job in a retry loop)
//! cannot keep the controller and etcd busy for everyone else.
//!
//! Every call but `/health` takes a token from its caller's bucket: the caller is the principal
//! of its client certificate, else its IP address. A caller over its rate is answered `429
//! throttled` with `Retry-After` before any work is done (nothing was changed, so the call can
//! be sent again as it is; [`crate::client::AdminClient`] does so). Refusals are counted in
//! `/metrics`. At most [`CALLERS_TRACKED_MAX`] callers are tracked; full buckets are forgotten
//! first.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rialto_protocol::rate::TokenBucket;

use crate::api::ApiState;
use crate::error::ControllerError;
use crate::serve::{Caller, Peer};

/// Default admin calls per second per caller.
pub const CALLS_PER_SECOND_DEFAULT: f64 = 100.0;
/// Default calls a caller may make at once above its rate.
pub const CALLS_BURST_DEFAULT: f64 = 200.0;
/// Most callers whose buckets are kept.
pub const CALLERS_TRACKED_MAX: usize = 10_000;

/// The admin API's call rate per caller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallRate {
    /// Calls per second; zero or less: unlimited.
    pub per_second: f64,
    /// Calls at once above the rate.
    pub burst: f64,
}

impl Default for CallRate {
    fn default() -> Self {
        CallRate {
            per_second: CALLS_PER_SECOND_DEFAULT,
            burst: CALLS_BURST_DEFAULT,
        }
    }
}

/// The buckets of the callers seen.
#[derive(Debug)]
pub(crate) struct Throttle {
    rate: CallRate,
    buckets: Mutex<HashMap<String, Arc<TokenBucket>>>,
    /// Calls refused for their rate.
    pub throttled: AtomicU64,
}

impl Throttle {
    pub(crate) fn new(rate: CallRate) -> Throttle {
        Throttle {
            rate,
            buckets: Mutex::new(HashMap::new()),
            throttled: AtomicU64::new(0),
        }
    }

    /// Takes a call of `caller` at `now`; `Err` with the wait before its next call.
    fn admit(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        if self.rate.per_second <= 0.0 {
            return Ok(());
        }
        let bucket = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
            if !buckets.contains_key(caller) && buckets.len() >= CALLERS_TRACKED_MAX {
                buckets.retain(|_, b| !b.is_full(now));
                if buckets.len() >= CALLERS_TRACKED_MAX {
                    // Every tracked caller is busy: this one is not tracked, and so is limited
                    // only by the connection bound.
                    return Ok(());
                }
            }
            buckets
                .entry(caller.to_string())
                .or_insert_with(|| {
                    Arc::new(TokenBucket::new(
                        self.rate.per_second,
                        self.rate.burst.max(1.0),
                        now,
                    ))
                })
                .clone()
        };
        bucket.take_whole(1.0, now)
    }
}

fn caller_name(request: &Request) -> String {
    let principal = request
        .extensions()
        .get::<Caller>()
        .and_then(|c| c.0.as_ref());
    match (principal, request.extensions().get::<Peer>()) {
        (Some(p), _) => p.as_str().to_string(),
        (None, Some(Peer(ip))) => format!("address {ip}"),
        (None, None) => format!("address {}", IpAddr::from([0, 0, 0, 0])),
    }
}

/// The middleware: runs before authorization, so a caller refused for its rate costs no
/// ACL lookup either.
pub(crate) async fn limit(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let caller = caller_name(&request);
    // Tokio's clock, so that a simulated cluster's time refills the buckets.
    match state
        .throttle
        .admit(&caller, tokio::time::Instant::now().into_std())
    {
        Ok(()) => next.run(request).await,
        Err(retry_after) => {
            if state.throttle.throttled.fetch_add(1, Ordering::Relaxed) % 100 == 0 {
                tracing::warn!(%caller, path = request.uri().path(), "admin calls throttled");
            }
            ControllerError::Throttled {
                message: format!(
                    "{caller} is over the admin API's rate ({} calls per second, bursts of {}): \
                     retry after {} ms",
                    state.throttle.rate.per_second,
                    state.throttle.rate.burst,
                    retry_after.as_millis().max(1)
                ),
                retry_after,
            }
            .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_caller_has_its_own_bucket_and_an_unlimited_rate_admits_all() {
        let t0 = Instant::now();
        let throttle = Throttle::new(CallRate {
            per_second: 1.0,
            burst: 2.0,
        });
        assert!(throttle.admit("a", t0).is_ok());
        assert!(throttle.admit("a", t0).is_ok());
        let wait = throttle.admit("a", t0).expect_err("a's burst is spent");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(throttle.admit("b", t0).is_ok(), "b is not a");
        assert!(throttle.admit("a", t0 + Duration::from_secs(1)).is_ok());

        let open = Throttle::new(CallRate {
            per_second: 0.0,
            burst: 0.0,
        });
        assert!((0..10_000).all(|_| open.admit("a", t0).is_ok()));
    }

    #[test]
    fn full_buckets_are_forgotten_when_too_many_callers_are_tracked() {
        let t0 = Instant::now();
        let throttle = Throttle::new(CallRate {
            per_second: 1.0,
            burst: 1.0,
        });
        for i in 0..CALLERS_TRACKED_MAX {
            assert!(throttle.admit(&i.to_string(), t0).is_ok());
        }
        // All busy: a new caller is let through untracked.
        assert!(throttle.admit("new", t0).is_ok());
        assert!(throttle.admit("new", t0).is_ok());
        // A second later every bucket is full again and is forgotten for the new one.
        let t1 = t0 + Duration::from_secs(1);
        assert!(throttle.admit("new", t1).is_ok());
        assert!(throttle.admit("new", t1).is_err());
        assert_eq!(throttle.buckets.lock().unwrap().len(), 1);
    }
}
