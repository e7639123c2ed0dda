//! Choosing a replica for a request, leaving out those that already failed it:
//!
//! 1. A request of a session (a multi-turn chat: `X-Session-Id`, or OpenAI's `user`) goes back
//!    to the replica that served the session last, where its earlier turns are in the prefix
//!    cache, unless that replica is [`overloaded`].
//! 2. With the prompt's prefix-cache keys ([`PrefixHint`]), each ready replica gets a
//!    [`score`]: twice the prompt tokens it holds cached (by the router's prefix index), less
//!    the prefill ahead of the request there, its queue and its KV-cache pressure. The best wins
//!    if it holds some of the prompt (equal best: power of two choices among them).
//! 3. Otherwise (a prompt no replica holds, a tie, `--routing p2c`): two ready replicas at
//!    random, the less loaded of them (power of two choices).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::cluster::state::Replica;
use crate::cluster::state::{ReplicaState, parse_replica_model_id, replica_model_id};
use crate::cluster::view::{no_replica_reason, not_found};
use crate::cluster::{Cluster, Inner, Link};
use crate::error::ClusterError;
use crate::router::prefix::PrefixIndex;

/// A ready replica the router may send a request to.
#[derive(Debug, Clone)]
pub struct Target {
    pub worker: String,
    pub model_id: String,
    pub channel: Channel,
    pub inflight: Arc<AtomicU32>,
    /// The replica's prefill ahead ([`crate::cluster::state::Replica::prefill`]).
    pub prefill: Arc<AtomicU64>,
}

/// Sessions remembered at most; past it, sessions idle longer than [`SESSION_IDLE`] are
/// forgotten, and new ones are not remembered until there is room.
pub const MAX_SESSIONS: usize = 100_000;
/// A session idle this long is forgotten when room is needed.
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);

/// The replica each session was last routed to: (deployment, session) → (worker, replica id,
/// when).
#[derive(Debug, Default)]
pub struct Sessions {
    last: HashMap<(String, String), (String, String, Instant)>,
}

impl Sessions {
    fn get(&self, model: &str, session: &str) -> Option<&(String, String, Instant)> {
        self.last.get(&(model.to_string(), session.to_string()))
    }

    fn record(&mut self, model: &str, session: &str, target: &Target, now: Instant) {
        let key = (model.to_string(), session.to_string());
        if !self.last.contains_key(&key) && self.last.len() >= MAX_SESSIONS {
            self.last.retain(|_, (_, _, at)| now.saturating_duration_since(*at) < SESSION_IDLE);
            if self.last.len() >= MAX_SESSIONS {
                return;
            }
        }
        self.last.insert(key, (target.worker.clone(), target.model_id.clone(), now));
    }

    /// Sessions remembered.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// Whether a replica with `load` requests (in flight and queued) is too busy to keep its
/// sessions, when the least loaded ready replica has `least`: more than twice as many, and at
/// least two more.
pub fn overloaded(load: u64, least: u64) -> bool {
    load > least.saturating_mul(2).max(least + 2)
}

/// What the router knows of a request's prompt for routing by prefix: the prefix-cache keys of
/// its full blocks, as the replicas key them (`gantry_core::prefix`).
#[derive(Debug, Clone, Default)]
pub struct PrefixHint {
    pub keys: Vec<u64>,
    pub block_tokens: u32,
    pub prompt_tokens: usize,
}

/// Prompt tokens that one request in flight or queued at a replica weighs beside the prefill
/// ahead of it: the decoding steps it shares (a batching replica runs its requests together,
/// so what a new request waits for is mostly the prompts ahead of it, counted apart).
pub const QUEUE_TOKENS: u64 = 16;
/// Prompt tokens that a KV cache whose blocks all hold running sequences weighs (in proportion
/// to the share held): a new sequence there may wait for blocks or preempt another.
pub const KV_TOKENS: u64 = 512;

/// A replica's score for a prompt, in prompt tokens: twice `cached` (what it need not
/// compute), less `prefill` (prompt tokens it has yet to compute for requests ahead), `queue`
/// and `kv`. A cached prefix counts twice: once for this request's own wait, once for the
/// compute a cold replica would spend on it, which every request after waits for — so a
/// replica keeps a tenant's prompt until the prefill ahead of it is about twice that prompt,
/// and only then does the prompt get a second home.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Score {
    pub cached: u64,
    pub prefill: u64,
    pub queue: u64,
    pub kv: u64,
}

impl Score {
    pub fn total(&self) -> i64 {
        2 * self.cached as i64 - self.prefill as i64 - self.queue as i64 - self.kv as i64
    }
}

/// What a replica carries when a request is scored: requests in flight and queued, the
/// prefill ahead, and KV blocks held by sequences out of all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    pub requests: u64,
    pub prefill: u64,
    pub kv_used: u64,
    pub kv_total: u64,
}

/// The score of a replica holding `cached_blocks` leading blocks of the prompt, under `load`.
pub fn score(hint: &PrefixHint, cached_blocks: usize, load: Load) -> Score {
    // The prompt's last token is computed however much is cached (its logits start the reply).
    let cached = (cached_blocks as u64 * u64::from(hint.block_tokens)).min(hint.prompt_tokens.saturating_sub(1) as u64);
    let kv = (KV_TOKENS * load.kv_used.min(load.kv_total)).checked_div(load.kv_total).unwrap_or(0);
    Score { cached, prefill: load.prefill, queue: load.requests.saturating_mul(QUEUE_TOKENS), kv }
}

/// Why a replica was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChosenBy {
    /// The only ready replica.
    Only,
    /// The replica the request's session last went to.
    Session,
    /// The best [`score`], held by a replica holding part of the prompt.
    Prefix,
    /// Power of two choices: no hint, a prompt no replica holds, or a tie.
    P2c,
    /// A failed-over request's standby, whose prefix cache holds its tokens up to the last
    /// standby prefill (`--standby-prefill`).
    Standby,
}

impl ChosenBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ChosenBy::Only => "only",
            ChosenBy::Session => "session",
            ChosenBy::Prefix => "prefix",
            ChosenBy::P2c => "p2c",
            ChosenBy::Standby => "standby",
        }
    }
}

/// A routing decision: the replica, why, and (for a request with a hint) its score.
#[derive(Debug, Clone)]
pub struct Routed {
    pub target: Target,
    pub by: ChosenBy,
    pub score: Option<Score>,
}

/// A ready replica, as the router weighs it (borrowed from the cluster's state; its
/// [`Target`] is built only for the one chosen).
struct Candidate<'a> {
    worker: &'a str,
    index: u32,
    replica: &'a Replica,
    link: &'a Link,
}

impl Candidate<'_> {
    fn target(&self, model: &str) -> Target {
        Target {
            worker: self.worker.to_string(),
            model_id: replica_model_id(model, self.index),
            channel: self.link.channel.clone(),
            inflight: self.replica.inflight.clone(),
            prefill: self.replica.prefill.clone(),
        }
    }
}

/// Why a request has no standby replica for now ([`Cluster::standby`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStandby {
    /// No ready replica of its deployment on another worker.
    Elsewhere,
    /// Those on other workers are all serving requests, and only an idle one may be a standby.
    Busy,
}

/// A deployment's ready replicas, less those to avoid.
struct Ready<'a> {
    model: &'a str,
    candidates: Vec<Candidate<'a>>,
    /// The candidates' replica ids (`model/index`), one after another: candidate `i`'s is
    /// `ids[ends[i - 1]..ends[i]]` (one buffer: a decision over 1,000 replicas allocating one
    /// each spent a tenth of its time on it).
    ids: String,
    ends: Vec<usize>,
    /// What each candidate carries, for scoring and for load.
    loads: Vec<Load>,
    /// Replicas left out because they failed this request.
    failed_here: Vec<u32>,
}

impl<'a> Ready<'a> {
    fn of(inner: &'a Inner, model: &'a str, avoid: &[(String, String)]) -> Result<Ready<'a>, ClusterError> {
        let st = &inner.state;
        let d = st.deployments.get(model).ok_or_else(|| not_found(st, model))?;
        let n = d.replicas.len();
        let mut ready = Ready {
            model,
            candidates: Vec::with_capacity(n),
            ids: String::with_capacity(n * (model.len() + 5)),
            ends: Vec::with_capacity(n),
            loads: Vec::with_capacity(n),
            failed_here: Vec::new(),
        };
        let mut model_id = String::new();
        for (&i, r) in &d.replicas {
            if r.state != ReplicaState::Ready {
                continue;
            }
            let Some(stage) = r.placement.as_ref().and_then(|p| p.stages.first()) else { continue };
            let Some(w) = st.workers.get(&stage.node).filter(|w| !w.lost) else { continue };
            let Some(link) = inner.links.get(&w.id) else { continue };
            replica_id_into(&mut model_id, model, i);
            if avoid.iter().any(|(worker, id)| *worker == w.id && *id == model_id) {
                ready.failed_here.push(i);
                continue;
            }
            let reported = w.model(&model_id);
            let queued = reported.map_or(0, |m| u64::from(m.queued));
            ready.loads.push(Load {
                requests: u64::from(r.inflight.load(Ordering::Relaxed)) + queued,
                prefill: r.prefill.load(Ordering::Relaxed),
                kv_used: reported.map_or(0, |m| m.kv_blocks_used),
                kv_total: reported.map_or(0, |m| m.kv_blocks_total),
            });
            ready.candidates.push(Candidate { worker: &w.id, index: i, replica: r, link });
            ready.ids.push_str(&model_id);
            ready.ends.push(ready.ids.len());
        }
        if ready.candidates.is_empty() {
            return Err(ClusterError::NoReadyReplica(no_replica_reason(model, d, &ready.failed_here)));
        }
        Ok(ready)
    }

    fn len(&self) -> usize {
        self.candidates.len()
    }

    fn load(&self, i: usize) -> u64 {
        self.loads[i].requests
    }

    fn least(&self) -> u64 {
        self.loads.iter().map(|l| l.requests).min().unwrap_or(0)
    }

    /// Power of two choices among `among` (indices into the candidates).
    fn p2c(&self, among: &[usize]) -> usize {
        match among.len() {
            0 | 1 => among.first().copied().unwrap_or(0),
            n => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (among[a], among[b]);
                if self.load(b) < self.load(a) { b } else { a }
            }
        }
    }

    /// Where in the candidates the replica `session` last went to is.
    fn session(&self, sessions: &Sessions, session: &str) -> Option<usize> {
        let (worker, id, _) = sessions.get(self.model, session)?;
        let (_, index) = parse_replica_model_id(id)?;
        self.candidates.iter().position(|c| c.worker == worker && c.index == index)
    }

    /// Candidate `i`'s replica id.
    fn id(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.ids[start..self.ends[i]]
    }

    /// The candidate that is replica `id` on `worker`.
    fn position(&self, worker: &str, id: &str) -> Option<usize> {
        (0..self.len()).find(|&i| self.candidates[i].worker == worker && self.id(i) == id)
    }

    /// The candidates holding part of the prompt that reach the best score over all candidates
    /// (none when a replica holding none of it scores best). The same answer as
    /// scoring every candidate, looking up fewer: candidates go in the order of the score they
    /// would have holding the whole prompt, and the search stops at the first one whose such
    /// score is below the best found (it, and every one after it, cannot reach the best). The
    /// scores looked up are left in `found`.
    fn best_holders(&self, index: &PrefixIndex, hint: &PrefixHint, found: &mut [Option<Score>]) -> Vec<usize> {
        let mixed = crate::router::prefix::mixed(&hint.keys);
        let bounds: Vec<i64> = self.loads.iter().map(|&l| score(hint, hint.keys.len(), l).total()).collect();
        best_holders_by(&bounds, |i| {
            let s = score(hint, index.held_run_mixed(self.candidates[i].worker, self.id(i), &mixed), self.loads[i]);
            found[i] = Some(s);
            s
        })
    }
}

/// The candidates holding part of the prompt that reach the best score over all of them (none
/// when one holding none scores best), `bound[i]` being candidate `i`'s score were it to hold
/// the whole prompt and `look(i)` its score: candidates are looked up in the order of their
/// bounds, down to the first whose bound is below the best found.
fn best_holders_by(bound: &[i64], mut look: impl FnMut(usize) -> Score) -> Vec<usize> {
    let mut order: Vec<usize> = (0..bound.len()).collect();
    order.sort_unstable_by(|&a, &b| bound[b].cmp(&bound[a]));
    let mut best = i64::MIN;
    let mut tied = Vec::new();
    for i in order {
        if bound[i] < best {
            break;
        }
        let s = look(i);
        let total = s.total();
        if total > best {
            best = total;
            tied.clear();
        }
        if total == best && s.cached > 0 {
            tied.push(i);
        }
    }
    tied.sort_unstable();
    tied
}

/// Writes [`replica_model_id`]`(model, index)` into `buf` (without the formatting machinery:
/// it runs for every replica of every decision).
fn replica_id_into(buf: &mut String, model: &str, index: u32) {
    buf.clear();
    buf.push_str(model);
    buf.push('/');
    let mut digits = [0u8; 10];
    let mut n = index;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[at..] {
        buf.push(char::from(d));
    }
}

impl Cluster {
    /// A ready replica of `model` for a request, leaving out `avoid` (replicas that failed it,
    /// as worker and replica id): see the module's doc.
    pub fn pick(&self, model: &str, avoid: &[(String, String)], session: Option<&str>) -> Result<Target, ClusterError> {
        self.choose(model, avoid, session, None).map(|r| r.target)
    }

    /// As [`Cluster::pick`], scoring the replicas by `hint` when there is one; the chosen
    /// replica is then expected to hold the prompt's blocks (added to the prefix index), so the
    /// next request with the same prefix finds it before its worker's next heartbeat.
    pub fn choose(
        &self,
        model: &str,
        avoid: &[(String, String)],
        session: Option<&str>,
        hint: Option<&PrefixHint>,
    ) -> Result<Routed, ClusterError> {
        let routed = {
            let mut inner = self.lock();
            let routed = self.choose_ready(&inner, model, avoid, session, hint)?;
            if let Some(h) = hint {
                inner.state.prefix.add(&routed.target.worker, &routed.target.model_id, &h.keys);
            }
            routed
        };
        if let Some(s) = session {
            let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            sessions.record(model, s, &routed.target, Instant::now());
        }
        Ok(routed)
    }

    fn choose_ready(
        &self,
        inner: &Inner,
        model: &str,
        avoid: &[(String, String)],
        session: Option<&str>,
        hint: Option<&PrefixHint>,
    ) -> Result<Routed, ClusterError> {
        let ready = Ready::of(inner, model, avoid)?;
        let index = &inner.state.prefix;
        // Scores found so far (the replicas the prefix search below looked up).
        let mut found: Vec<Option<Score>> = vec![None; ready.len()];
        let scored = |i: usize, found: &[Option<Score>]| {
            hint.map(|h| {
                found[i].unwrap_or_else(|| {
                    score(h, index.held_run(ready.candidates[i].worker, ready.id(i), &h.keys), ready.loads[i])
                })
            })
        };
        let take = |i: usize, by: ChosenBy, found: &[Option<Score>]| Routed {
            target: ready.candidates[i].target(model),
            by,
            score: scored(i, found),
        };
        if let Some(i) = self.session_stays(&ready, session) {
            return Ok(take(i, ChosenBy::Session, &found));
        }
        if ready.len() == 1 {
            return Ok(take(0, ChosenBy::Only, &found));
        }
        if let Some(h) = hint.filter(|h| !h.keys.is_empty()) {
            let tied = ready.best_holders(index, h, &mut found);
            if !tied.is_empty() {
                let i = ready.p2c(&tied);
                return Ok(take(i, if tied.len() == 1 { ChosenBy::Prefix } else { ChosenBy::P2c }, &found));
            }
            // No replica holds any of the prompt, or one holding none outscores every holder
            // (their queues): by load.
        }
        let all: Vec<usize> = (0..ready.len()).collect();
        Ok(take(ready.p2c(&all), ChosenBy::P2c, &found))
    }

    /// Where a request running on `worker` would go on should that worker fail, for the standby
    /// prefill (`ControllerConfig::standby_prefill`): replica `keep` (worker, replica id) while
    /// it is still ready, as its prefix cache holds the request's earlier tokens; else the
    /// ready replica of `model` on another worker with the fewest requests in flight, leaving
    /// out `avoid`. With `idle_only`, only a replica with no request in flight (through this
    /// controller) or queued (as its worker reports) will do: the standby's prefill then uses
    /// capacity nothing else wants.
    pub fn standby(
        &self,
        model: &str,
        worker: &str,
        avoid: &[(String, String)],
        keep: Option<&(String, String)>,
        idle_only: bool,
    ) -> Result<Target, NoStandby> {
        let inner = self.lock();
        let ready = Ready::of(&inner, model, avoid).map_err(|_| NoStandby::Elsewhere)?;
        let elsewhere = |i: usize| ready.candidates[i].worker != worker;
        let usable = |i: usize| elsewhere(i) && (!idle_only || ready.load(i) == 0);
        let kept = keep.and_then(|(w, id)| ready.position(w, id)).filter(|&i| usable(i));
        match kept.or_else(|| (0..ready.len()).filter(|&i| usable(i)).min_by_key(|&i| ready.load(i))) {
            Some(i) => Ok(ready.candidates[i].target(model)),
            None if (0..ready.len()).any(elsewhere) => Err(NoStandby::Busy),
            None => Err(NoStandby::Elsewhere),
        }
    }

    /// Replica `standby` (worker, replica id) of `model` for a failed-over request, when it is
    /// ready and not in `avoid` (the ready set leaves those out).
    pub fn choose_standby(
        &self,
        model: &str,
        standby: &(String, String),
        avoid: &[(String, String)],
    ) -> Option<Routed> {
        let inner = self.lock();
        let ready = Ready::of(&inner, model, avoid).ok()?;
        let i = ready.position(&standby.0, &standby.1)?;
        Some(Routed { target: ready.candidates[i].target(model), by: ChosenBy::Standby, score: None })
    }

    /// The replica to ask for a prompt's token ids when routing by prefix is worth it: the
    /// least loaded ready one (by requests in flight through this controller), when there are
    /// two or more, the request's session (if any) has no replica to go back to, and some
    /// replica of the deployment holds prefix-cache keys. `None` otherwise.
    ///
    /// Without a session it reads only the deployment's replicas (no worker's status): a
    /// decision over 1,000 replicas spent a third of its time here when it weighed each
    /// replica's worker as `choose` does.
    pub fn tokenizer_for(&self, model: &str, avoid: &[(String, String)], session: Option<&str>) -> Option<Target> {
        let inner = self.lock();
        if !inner.state.prefix.has_keys_for(model) {
            return None;
        }
        if session.is_none()
            && let Some(found) = self.least_in_flight(&inner, model, avoid)
        {
            return found;
        }
        let ready = Ready::of(&inner, model, avoid).ok()?;
        if ready.len() < 2 {
            return None;
        }
        if self.session_stays(&ready, session).is_some() {
            return None;
        }
        let least = ready.least();
        let i = (0..ready.len()).find(|&i| ready.load(i) == least)?;
        Some(ready.candidates[i].target(model))
    }

    /// The ready replica of `model` with the fewest requests in flight, when its worker is
    /// connected and it is not to be avoided: `Some(None)` when fewer than two replicas are
    /// ready, `None` when the full weighing must decide.
    fn least_in_flight(&self, inner: &Inner, model: &str, avoid: &[(String, String)]) -> Option<Option<Target>> {
        let st = &inner.state;
        let d = st.deployments.get(model)?;
        let mut ready = 0;
        let mut best: Option<(u32, u32, &Replica)> = None;
        for (&i, r) in &d.replicas {
            if r.state != ReplicaState::Ready {
                continue;
            }
            ready += 1;
            let load = r.inflight.load(Ordering::Relaxed);
            if best.is_none_or(|(l, _, _)| load < l) {
                best = Some((load, i, r));
            }
        }
        if ready < 2 {
            return Some(None);
        }
        let (_, index, replica) = best?;
        let stage = replica.placement.as_ref().and_then(|p| p.stages.first())?;
        let w = st.workers.get(&stage.node).filter(|w| !w.lost)?;
        let link = inner.links.get(&w.id)?;
        let candidate = Candidate { worker: &w.id, index, replica, link };
        let id = replica_model_id(model, index);
        if avoid.iter().any(|(worker, x)| *worker == w.id && *x == id) {
            return None;
        }
        Some(Some(candidate.target(model)))
    }

    /// Where in `ready` the replica `session` last went to is, when the request goes back
    /// there: it is ready and not [`overloaded`] (the sessions' lock is taken under the
    /// cluster's, never the other way round).
    fn session_stays(&self, ready: &Ready, session: Option<&str>) -> Option<usize> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let i = ready.session(&sessions, session?)?;
        (!overloaded(ready.load(i), ready.least())).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounded_search_finds_the_holders_scoring_every_replica_would() {
        let hint = PrefixHint { keys: vec![0; 8], block_tokens: 16, prompt_tokens: 140 };
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for round in 0..2000 {
            let n = 1 + (round % 40);
            // Few distinct loads and runs, so that ties are common.
            let loads: Vec<Load> = (0..n)
                .map(|_| Load { requests: next(4), prefill: 16 * next(3), kv_used: next(3), kv_total: 2 })
                .collect();
            let runs: Vec<usize> = (0..n).map(|_| [0, 0, 3, 8][next(4) as usize]).collect();
            let all: Vec<Score> = (0..n).map(|i| score(&hint, runs[i], loads[i])).collect();
            let best = all.iter().map(Score::total).max().unwrap();
            let want: Vec<usize> = (0..n).filter(|&i| all[i].cached > 0 && all[i].total() == best).collect();
            let bounds: Vec<i64> = loads.iter().map(|&l| score(&hint, 8, l).total()).collect();
            let mut looked = 0;
            let got = best_holders_by(&bounds, |i| {
                looked += 1;
                all[i]
            });
            assert_eq!(got, want, "round {round}: loads {loads:?} runs {runs:?}");
            assert!(looked <= n);
        }
    }

    #[test]
    fn a_session_keeps_its_replica_until_it_is_overloaded() {
        // Twice the least loaded and two more: 0 → 3, 1 → 4, 4 → 9.
        assert!(!overloaded(2, 0) && overloaded(3, 0));
        assert!(!overloaded(3, 1) && overloaded(4, 1));
        assert!(!overloaded(8, 4) && overloaded(9, 4));
        assert!(!overloaded(0, 0));
    }

    #[test]
    fn a_score_is_the_cached_prefix_less_prefill_ahead_queue_and_kv_pressure() {
        let hint = PrefixHint { keys: vec![0; 64], block_tokens: 16, prompt_tokens: 1024 };
        // All 64 blocks cached: the last token is computed anyway, so 1,023 are saved.
        let idle = Load::default();
        assert_eq!(score(&hint, 64, idle), Score { cached: 1023, prefill: 0, queue: 0, kv: 0 });
        let s = score(&hint, 10, Load { requests: 3, prefill: 300, kv_used: 75, kv_total: 100 });
        assert_eq!((s.cached, s.prefill, s.queue, s.kv, s.total()), (160, 300, 48, 384, -412));
        // An unknown KV size weighs nothing; a used count past the total weighs the full cache.
        assert_eq!(score(&hint, 1, Load { kv_used: 5, ..idle }).kv, 0);
        assert_eq!(score(&hint, 1, Load { kv_used: 500, kv_total: 100, ..idle }).kv, KV_TOKENS);
    }

    #[test]
    fn a_client_id_is_printable_and_bounded() {
        use crate::router::client_id;
        assert_eq!(client_id(" chat-7 ").as_deref(), Some("chat-7"));
        assert_eq!(client_id(""), None);
        assert_eq!(client_id("two words"), None);
        assert_eq!(client_id("é"), None);
        assert_eq!(client_id(&"x".repeat(129)), None);
        assert_eq!(client_id(&"x".repeat(128)).map(|s| s.len()), Some(128));
    }

    #[tokio::test]
    async fn sessions_are_bounded_and_idle_ones_make_room() {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let t = Target {
            worker: "w".into(),
            model_id: "m-0".into(),
            channel,
            inflight: Arc::default(),
            prefill: Arc::default(),
        };
        let mut s = Sessions::default();
        let start = Instant::now();
        for i in 0..MAX_SESSIONS {
            s.record("m", &format!("s{i}"), &t, start);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        // Full: a new session is not remembered while every one is fresh…
        s.record("m", "new", &t, start + Duration::from_secs(1));
        assert!(s.get("m", "new").is_none() && s.len() == MAX_SESSIONS);
        // …and a known one is still updated.
        s.record("m", "s1", &t, start + Duration::from_secs(2));
        assert_eq!(s.get("m", "s1").map(|x| x.2), Some(start + Duration::from_secs(2)));
        // Once they have been idle past SESSION_IDLE, they make room.
        s.record("m", "new", &t, start + SESSION_IDLE + Duration::from_secs(1));
        assert!(s.get("m", "new").is_some());
        assert_eq!(s.len(), 2, "only s1 (used later) and the new one stay");
    }
}
