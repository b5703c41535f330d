//! Retry policy: exponential backoff with jitter, bounded by attempts and a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use rand::RngExt;

use super::error::RegistryError;

/// How often and how patiently a fetch is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per endpoint, the first included.
    pub max_attempts: u32,
    /// First pause between attempts.
    pub initial: Duration,
    /// Longest pause.
    pub max: Duration,
    /// Limit for the whole operation, attempts and sleeps included.
    pub deadline: Duration,
    /// Limit for one attempt that moves no bulk data (a manifest, a token).
    pub attempt_timeout: Duration,
    /// Slowest transfer rate, in bytes per second, still taken for progress: an attempt that
    /// moves `n` bytes gets `n / min_rate` on top of `attempt_timeout`, and the operation as
    /// much on top of `deadline`, so a large blob is not cut off by limits sized for small
    /// requests. 0 gives no allowance. Stalls are caught sooner by the client's read timeout.
    pub min_rate: u64,
}

impl RetryPolicy {
    /// The sleep before attempt `n + 1` (n >= 1): `initial * 2^(n-1)` capped at `max`, with
    /// "equal jitter" (half fixed, half random) so a fleet of nodes does not retry in step.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << n.saturating_sub(1).min(20));
        let capped = exp.min(self.max);
        let half = capped / 2;
        let jitter = rand::rng().random_range(0..=half.as_micros() as u64);
        half + Duration::from_micros(jitter)
    }

    /// This policy for an operation that moves `bytes` of data (see [`min_rate`](Self::min_rate)).
    pub fn for_transfer(&self, bytes: u64) -> RetryPolicy {
        let allowance = match self.min_rate {
            0 => Duration::ZERO,
            rate => Duration::from_secs_f64(bytes as f64 / rate as f64),
        };
        RetryPolicy {
            attempt_timeout: self.attempt_timeout.saturating_add(allowance),
            deadline: self.deadline.saturating_add(allowance),
            ..self.clone()
        }
    }

    /// Run `attempt` until it succeeds, fails with a final error, or the budget is spent.
    pub async fn run<T, F, Fut>(&self, what: &str, attempt: F) -> Result<T, RegistryError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let open = || std::future::ready(());
        self.run_until(what, Instant::now() + self.deadline, open, attempt)
            .await
    }

    /// Like [`run`](Self::run), with an absolute deadline shared by several endpoints, and a
    /// `gate` (a per-host connection permit) awaited before each attempt and held only while
    /// it runs: never across the backoff sleep, so a host's other fetches use the slot.
    /// Waiting at the gate counts against the deadline, not against the attempt's timeout.
    pub async fn run_until<T, G, Gf, F, Fut>(
        &self,
        what: &str,
        until: Instant,
        gate: impl Fn() -> Gf,
        mut attempt: F,
    ) -> Result<T, RegistryError>
    where
        Gf: Future<Output = G>,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let start = Instant::now();
        let mut n = 0;
        loop {
            n += 1;
            let left = until.saturating_duration_since(Instant::now());
            let Ok(permit) = tokio::time::timeout(left, gate()).await else {
                return Err(RegistryError::Timeout(start.elapsed()));
            };
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RegistryError::Timeout(start.elapsed()));
            }
            let limit = self.attempt_timeout.min(left);
            let result = match tokio::time::timeout(limit, attempt(n)).await {
                Ok(r) => r,
                Err(_) => Err(RegistryError::Timeout(limit)),
            };
            drop(permit);
            let err = match result {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let sleep = self.backoff(n);
            let out_of_budget = n >= self.max_attempts || Instant::now() + sleep >= until;
            if !err.is_retryable() {
                return Err(err);
            }
            if out_of_budget {
                return Err(RegistryError::Exhausted {
                    attempts: n,
                    elapsed: start.elapsed(),
                    last: Box::new(err),
                });
            }
            tracing::warn!(what, attempt = n, error = %err, retry_in = ?sleep, "registry fault, retrying");
            tokio::time::sleep(sleep).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            initial: Duration::from_millis(1),
            max: Duration::from_millis(4),
            deadline: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(1),
            min_rate: 1 << 20,
        }
    }

    #[test]
    fn transfers_get_time_in_proportion_to_their_size() {
        let p = policy();
        let small = p.for_transfer(0);
        assert_eq!(small.attempt_timeout, p.attempt_timeout);
        assert_eq!(small.deadline, p.deadline);
        let big = p.for_transfer(256 << 20);
        assert_eq!(big.attempt_timeout, p.attempt_timeout + Duration::from_secs(256));
        assert_eq!(big.deadline, p.deadline + Duration::from_secs(256));
        let half = p.for_transfer(1 << 19);
        assert_eq!(half.attempt_timeout, p.attempt_timeout + Duration::from_millis(500));
        let off = RetryPolicy {
            min_rate: 0,
            ..p.clone()
        }
        .for_transfer(1 << 30);
        assert_eq!(off.attempt_timeout, p.attempt_timeout);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            ..policy()
        };
        for _ in 0..50 {
            let b1 = p.backoff(1);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b10 = p.backoff(10);
            assert!(b10 >= Duration::from_millis(500) && b10 <= Duration::from_millis(1000));
        }
    }

    #[tokio::test]
    async fn retries_retryable_until_success() {
        let calls = AtomicU32::new(0);
        let r = policy()
            .run("t", |_| async {
                if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(RegistryError::Status {
                        status: 503,
                        url: String::new(),
                    })
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn final_errors_are_not_retried_and_attempts_are_bounded() {
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = policy()
            .run("t", |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(RegistryError::Unauthorized(String::new()))
            })
            .await;
        assert!(matches!(r, Err(RegistryError::Unauthorized(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let calls = AtomicU32::new(0);
        let r: Result<(), _> = policy()
            .run("t", |_| async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(RegistryError::Transport("reset".into()))
            })
            .await;
        assert!(matches!(r, Err(RegistryError::Exhausted { attempts: 4, .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn slow_attempts_time_out() {
        let p = RetryPolicy {
            attempt_timeout: Duration::from_millis(20),
            max_attempts: 2,
            ..policy()
        };
        let start = Instant::now();
        let r: Result<(), _> = p
            .run("t", |_| async {
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            })
            .await;
        assert!(matches!(r, Err(RegistryError::Exhausted { .. })));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn the_gate_is_free_while_an_attempt_backs_off() {
        let p = RetryPolicy {
            initial: Duration::from_millis(400),
            max: Duration::from_millis(400),
            max_attempts: 2,
            ..policy()
        };
        let slot = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let calls = AtomicU32::new(0);
        let gate = || std::sync::Arc::clone(&slot).acquire_owned();
        let calls = &calls;
        let retried = p.run_until("t", Instant::now() + p.deadline, gate, |n| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            if n == 1 {
                Err(RegistryError::Transport("reset".into()))
            } else {
                Ok(n)
            }
        });
        let other = async {
            // while the first operation sleeps (>= 200 ms of backoff), its slot is free
            tokio::time::sleep(Duration::from_millis(100)).await;
            let got = slot.try_acquire().is_ok();
            got
        };
        let (r, got) = tokio::join!(retried, other);
        assert_eq!(r.unwrap(), 2);
        assert!(got, "the permit was held across the backoff sleep");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }
}
