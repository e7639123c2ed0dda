//! Tenants kept apart: each API key's limits (streams open at once, generated tokens per
//! minute, a priority class) applied before a request reaches a worker's queue, so that one
//! tenant flooding cannot take the replicas from the others. A refusal is `RESOURCE_EXHAUSTED`
//! with a `retry-after` (seconds) in its metadata, which the OpenAI API answers as 429 with
//! `Retry-After`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tonic::Status;

use crate::auth::{Caller, Priority};

/// One key's running counts.
#[derive(Debug)]
struct Tenant {
    streams: u32,
    /// Tokens in the bucket (may go below zero: a stream's tokens are charged as they come),
    /// as of `refilled`.
    tokens: f64,
    refilled: Instant,
}

/// Every key's counts, by key name.
#[derive(Debug, Default)]
pub struct Tenants {
    by_name: Mutex<HashMap<String, Tenant>>,
}

/// A stream admitted for a key: ends its count when dropped; its tokens are charged when it
/// ends.
#[derive(Debug)]
pub struct Admitted {
    tenants: Arc<Tenants>,
    name: String,
    tpm: Option<u64>,
}

impl Admitted {
    /// Charges `n` generated tokens to the key.
    pub fn charge(&self, n: usize) {
        crate::metrics::key_tokens(&self.name, n as u64);
        if self.tpm.is_none() {
            return;
        }
        let mut all = self.tenants.lock();
        if let Some(t) = all.get_mut(&self.name) {
            t.tokens -= n as f64;
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(t) = self.tenants.lock().get_mut(&self.name) {
            t.streams = t.streams.saturating_sub(1);
        }
    }
}

/// A refusal: what to say, and when to try again (seconds).
fn refuse(message: String, retry_after: u64) -> Status {
    let mut s = Status::resource_exhausted(message);
    if let Ok(v) = retry_after.max(1).to_string().parse() {
        s.metadata_mut().insert("retry-after", v);
    }
    s
}

impl Tenants {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tenant>> {
        self.by_name.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a stream for `caller` (every stream, when keys are off) given the relay slots
    /// `free` of `max`; the refusal names the limit and when to retry.
    pub fn admit(
        self: &Arc<Self>,
        caller: Option<&Caller>,
        free: usize,
        max: usize,
    ) -> Result<Option<Admitted>, Status> {
        let Some(caller) = caller else { return Ok(None) };
        let limits = caller.limits;
        let name = caller.name.as_str();
        // Priority: a lower class leaves a share of the relay slots to the higher ones.
        let reserve = max * limits.priority.reserve_percent() / 100;
        if limits.priority != Priority::High && free <= reserve {
            crate::metrics::key_refused(name, "priority");
            return Err(refuse(
                format!(
                    "the controller is nearly full ({free} of {max} relay slots free) and the API key `{name}` has priority {}, which leaves the last {reserve} to higher ones; retry later",
                    limits.priority.name()
                ),
                1,
            ));
        }
        let mut all = self.lock();
        let now = Instant::now();
        let t = all.entry(name.to_string()).or_insert_with(|| Tenant {
            streams: 0,
            tokens: limits.tokens_per_minute.unwrap_or(0) as f64,
            refilled: now,
        });
        if let Some(max_streams) = limits.streams
            && t.streams >= max_streams
        {
            crate::metrics::key_refused(name, "streams");
            return Err(refuse(
                format!(
                    "the API key `{name}` has {} streams open, its limit (streams={max_streams}); retry when one ends",
                    t.streams
                ),
                1,
            ));
        }
        if let Some(tpm) = limits.tokens_per_minute {
            let per_second = tpm as f64 / 60.0;
            t.tokens = (t.tokens + now.duration_since(t.refilled).as_secs_f64() * per_second).min(tpm as f64);
            t.refilled = now;
            if t.tokens <= 0.0 {
                let wait = ((1.0 - t.tokens) / per_second).ceil() as u64;
                crate::metrics::key_refused(name, "tokens_per_minute");
                return Err(refuse(
                    format!("the API key `{name}` used its {tpm} tokens per minute (tpm={tpm}); retry in {wait} s"),
                    wait,
                ));
            }
        }
        t.streams += 1;
        crate::metrics::key_admitted(name);
        Ok(Some(Admitted { tenants: self.clone(), name: name.to_string(), tpm: limits.tokens_per_minute }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Limits, Role};

    fn caller(limits: Limits) -> Caller {
        Caller { role: Role::User, name: "alice".into(), limits }
    }

    #[test]
    fn streams_tokens_and_priority_are_each_enforced() {
        let tenants = Arc::new(Tenants::default());
        let two = caller(Limits { streams: Some(2), ..Limits::default() });
        let a = tenants.admit(Some(&two), 100, 100).unwrap();
        let b = tenants.admit(Some(&two), 100, 100).unwrap();
        let e = tenants.admit(Some(&two), 100, 100).unwrap_err();
        assert_eq!(e.message(), "the API key `alice` has 2 streams open, its limit (streams=2); retry when one ends");
        assert_eq!(e.metadata().get("retry-after").unwrap(), "1");
        drop(a);
        assert!(tenants.admit(Some(&two), 100, 100).is_ok(), "a stream that ended frees its place");
        drop(b);

        let tenants = Arc::new(Tenants::default());
        let tpm = caller(Limits { tokens_per_minute: Some(60), ..Limits::default() });
        let s = tenants.admit(Some(&tpm), 100, 100).unwrap().unwrap();
        s.charge(70);
        let e = tenants.admit(Some(&tpm), 100, 100).unwrap_err();
        assert!(
            e.message().starts_with("the API key `alice` used its 60 tokens per minute (tpm=60); retry in "),
            "{}",
            e.message()
        );
        let wait: u64 = e.metadata().get("retry-after").unwrap().to_str().unwrap().parse().unwrap();
        assert!((10..=12).contains(&wait), "11 tokens to refill at one a second: {wait}");

        let low = caller(Limits { priority: Priority::Low, ..Limits::default() });
        let high = caller(Limits { priority: Priority::High, ..Limits::default() });
        assert!(tenants.admit(Some(&low), 21, 100).is_ok());
        assert!(tenants.admit(Some(&low), 20, 100).unwrap_err().message().contains("has priority low"));
        assert!(tenants.admit(Some(&caller(Limits::default())), 20, 100).is_ok(), "normal keeps 5");
        assert!(tenants.admit(Some(&high), 1, 100).is_ok());
        assert!(tenants.admit(None, 0, 100).unwrap().is_none(), "without keys nothing is counted");
    }
}
