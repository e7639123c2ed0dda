//! The CPU runtime's thread pool: a forward pass runs as a sequence of operations, each split
//! into small chunks that any thread claims from a shared counter. Built so that a thread the
//! OS takes off its core — other processes on the node, the worker's own gRPC threads — never
//! holds the others up:
//!
//! * nobody waits for a thread to *start*: the caller works through the chunks itself, and
//!   helpers join in when they are running;
//! * nobody waits long for a thread to *finish*: a chunk computes into the thread's own scratch
//!   and is committed (copied into place) under a compare-and-swap, so when a chunk stays
//!   claimed past a short bound a waiting thread computes it again and commits first; the slow
//!   thread's late result is dropped;
//! * nobody waits for a job's stragglers: a job is reference-counted, so a thread that resumes
//!   after the job ended finds its chunks done and lets go;
//! * idle helpers spin briefly, then sleep until the next job.
//!
//! Results do not depend on which thread computed a chunk: a chunk's output is a function of
//! the job's inputs alone.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::quant::{ActBlock, ActBlockK};

/// A thread's private scratch, where chunks compute before they commit.
#[derive(Debug, Default)]
pub struct Scratch {
    pub f: Vec<f32>,
    pub g: Vec<f32>,
    pub q8: Vec<ActBlock>,
    pub q8k: Vec<ActBlockK>,
}

/// Work the pool runs: operations in order, each of independent chunks.
pub trait Task: Send + Sync {
    /// How many operations.
    fn ops(&self) -> usize;
    /// How many chunks operation `op` has (asked once every earlier operation is done).
    fn chunks(&self, op: usize) -> usize;
    /// Computes chunk `chunk` of `op` into `scratch`, reading only what earlier operations
    /// committed (and the task's own inputs). Must not write anything shared.
    fn run(&self, op: usize, chunk: usize, scratch: &mut Scratch);
    /// Writes `scratch` (as `run` left it) where chunk `chunk` of `op` puts its results. Called
    /// exactly once per chunk, by one thread.
    fn commit(&self, op: usize, chunk: usize, scratch: &Scratch);
}

const FREE: u32 = 0;
const COMMITTING: u32 = u32::MAX - 1;
const DONE: u32 = u32::MAX;

/// The progress of one operation of a job.
struct OpState {
    /// Chunks handed out so far.
    next: AtomicUsize,
    done: AtomicUsize,
    /// Per chunk: `FREE`, the claiming thread's id + 1, `COMMITTING` or `DONE`.
    state: Vec<AtomicU32>,
    /// When each chunk was claimed (nanoseconds since the pool started).
    claimed_at: Vec<AtomicU64>,
}

/// A job being run.
struct Job {
    id: u64,
    task: Arc<dyn Task>,
    /// Lazily made per operation (its chunk count is known once the one before is done).
    ops: Vec<Mutex<Option<Arc<OpState>>>>,
    /// Operations fully done.
    finished: AtomicUsize,
}

impl Job {
    /// The state of operation `op`, made by whoever asks first.
    fn op(&self, op: usize) -> Arc<OpState> {
        let mut slot = self.ops[op].lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert_with(|| {
            let n = self.task.chunks(op);
            Arc::new(OpState {
                next: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
                state: (0..n).map(|_| AtomicU32::new(FREE)).collect(),
                claimed_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
            })
        })
        .clone()
    }
}

struct Shared {
    job: Mutex<Option<Arc<Job>>>,
    wake: Condvar,
    /// The id of the newest job (0: none yet).
    latest: AtomicU64,
    stop: AtomicBool,
    origin: Instant,
    /// The job each helper is in (0: none), for [`Pool::oldest_active`].
    active: Vec<AtomicU64>,
    /// Chunks computed again by another thread because their first thread stalled.
    stolen: AtomicU64,
}

impl Shared {
    fn now_ns(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }
}

/// Threads the process's pool gets when it is made (0: not set, use [`default_threads`]).
static GLOBAL_THREADS: AtomicUsize = AtomicUsize::new(0);
static GLOBAL: std::sync::OnceLock<Pool> = std::sync::OnceLock::new();

/// The CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota (what
/// `std::thread::available_parallelism` reads on Linux), at least 1.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Sets how many threads the process's pool will have. Call it before the first model runs;
/// returns `false` (and changes nothing) once the pool exists with another size.
pub fn set_global_threads(threads: usize) -> bool {
    GLOBAL_THREADS.store(threads.max(1), Ordering::Relaxed);
    GLOBAL.get().is_none_or(|p| p.threads == threads.max(1))
}

/// The process's pool, which every model on the CPU runs on (made on first use).
pub fn global() -> &'static Pool {
    GLOBAL.get_or_init(|| {
        let n = GLOBAL_THREADS.load(Ordering::Relaxed);
        Pool::new(if n == 0 { default_threads() } else { n })
    })
}

/// A pool of `threads − 1` helpers; the thread calling [`Pool::run`] is the last one.
pub struct Pool {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
    threads: usize,
    next_job: AtomicU64,
    /// One job at a time.
    running: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads)
    }
}

/// How long an idle helper spins for the next job before it sleeps.
const IDLE_SPIN: Duration = Duration::from_micros(200);
/// A chunk claimed this long (plus a few times what the waiting thread's own chunk took) is
/// computed again by a waiting thread.
const STEAL_AFTER_NS: u64 = 60_000;

impl Pool {
    /// A pool for `threads` threads in all (at least 1).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            wake: Condvar::new(),
            latest: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            origin: Instant::now(),
            active: (0..threads).map(|_| AtomicU64::new(0)).collect(),
            stolen: AtomicU64::new(0),
        });
        let helpers = (1..threads)
            .map(|id| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("gantry-cpu-{id}"))
                    .spawn(move || helper(&shared, id))
                    .expect("the OS starts a thread")
            })
            .collect();
        Pool { shared, helpers, threads, next_job: AtomicU64::new(1), running: Mutex::new(()) }
    }

    /// Threads in all, the caller's included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Chunks computed twice so far because a thread stalled mid-chunk.
    pub fn stolen_chunks(&self) -> u64 {
        self.shared.stolen.load(Ordering::Relaxed)
    }

    /// The id of the oldest job a helper may still be working in (stragglers), or `u64::MAX`
    /// when none is: memory a task read may be reused once its job is older than this.
    pub fn oldest_active(&self) -> u64 {
        self.shared.active.iter().map(|a| a.load(Ordering::Acquire)).filter(|&j| j != 0).min().unwrap_or(u64::MAX)
    }

    /// Runs `task` to the end on this thread and whichever helpers join; returns the job's id.
    pub fn run(&self, task: Arc<dyn Task>) -> u64 {
        let _one = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let job = Arc::new(Job {
            id,
            ops: (0..task.ops()).map(|_| Mutex::new(None)).collect(),
            task,
            finished: AtomicUsize::new(0),
        });
        if self.threads > 1 {
            *self.shared.job.lock().unwrap_or_else(|p| p.into_inner()) = Some(job.clone());
            self.shared.latest.store(id, Ordering::Release);
            self.shared.wake.notify_all();
        }
        let mut scratch = Scratch::default();
        work(&self.shared, &job, 0, &mut scratch);
        // Helpers that did not pick the job up need not keep it alive.
        let mut slot = self.shared.job.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|j| j.id == id) {
            *slot = None;
        }
        id
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A helper: waits for a job, works in it, repeats.
fn helper(shared: &Shared, me: usize) {
    let mut seen = 0u64;
    let mut scratch = Scratch::default();
    loop {
        // Spin a little for the next job (jobs follow each other closely), then sleep.
        let spin_until = Instant::now() + IDLE_SPIN;
        while shared.latest.load(Ordering::Acquire) == seen && Instant::now() < spin_until {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            std::hint::spin_loop();
        }
        let job = {
            let mut slot = shared.job.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                match slot.as_ref() {
                    Some(j) if j.id != seen => break j.clone(),
                    _ => slot = shared.wake.wait(slot).unwrap_or_else(|p| p.into_inner()),
                }
            }
        };
        seen = job.id;
        shared.active[me].store(job.id, Ordering::Release);
        work(shared, &job, me, &mut scratch);
        shared.active[me].store(0, Ordering::Release);
    }
}

/// Works through `job`'s operations until all are done.
fn work(shared: &Shared, job: &Job, me: usize, scratch: &mut Scratch) {
    let tag = me as u32 + 1;
    let n_ops = job.ops.len();
    let mut op = job.finished.load(Ordering::Acquire);
    while op < n_ops {
        let st = job.op(op);
        let n = st.state.len();
        let mut own_ns = 0u64;
        // Fresh chunks first.
        loop {
            let c = st.next.fetch_add(1, Ordering::AcqRel);
            if c >= n {
                break;
            }
            if st.state[c].compare_exchange(FREE, tag, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            let t0 = shared.now_ns();
            st.claimed_at[c].store(t0, Ordering::Release);
            job.task.run(op, c, scratch);
            finish(job, &st, op, c, tag, scratch);
            own_ns = own_ns.max(shared.now_ns() - t0);
        }
        // Then wait for the others' chunks, computing again any that stays claimed too long.
        let mut spins = 0u32;
        while st.done.load(Ordering::Acquire) < n {
            if job.finished.load(Ordering::Acquire) > op {
                break;
            }
            let now = shared.now_ns();
            let bound = STEAL_AFTER_NS + 4 * own_ns;
            let mut stole = false;
            for c in 0..n {
                let s = st.state[c].load(Ordering::Acquire);
                if s == FREE || s == COMMITTING || s == DONE || s == tag {
                    continue;
                }
                if now.saturating_sub(st.claimed_at[c].load(Ordering::Acquire)) < bound {
                    continue;
                }
                if st.state[c].compare_exchange(s, tag, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    st.claimed_at[c].store(now, Ordering::Release);
                    shared.stolen.fetch_add(1, Ordering::Relaxed);
                    job.task.run(op, c, scratch);
                    finish(job, &st, op, c, tag, scratch);
                    stole = true;
                }
            }
            if !stole {
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    // Let the thread we wait for (or anyone) have the core.
                    std::thread::yield_now();
                }
            }
        }
        // The first to see the operation complete moves the job on.
        let _ = job.finished.compare_exchange(op, op + 1, Ordering::AcqRel, Ordering::Acquire);
        op = job.finished.load(Ordering::Acquire).max(op + 1);
    }
}

/// Commits a computed chunk if this thread still holds it.
fn finish(job: &Job, st: &OpState, op: usize, c: usize, tag: u32, scratch: &Scratch) {
    if st.state[c].compare_exchange(tag, COMMITTING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
        job.task.commit(op, c, scratch);
        st.state[c].store(DONE, Ordering::Release);
        st.done.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // a task writing shared memory under the pool's protocol, as the runtime's do
mod tests {
    use std::cell::UnsafeCell;

    use super::*;

    /// Two operations: op 0 writes `i²` into `a[i]`; op 1 writes `a[n−1−i] + 1` into `b[i]`.
    /// The first chunk a helper runs stalls for `stall`.
    struct Squares {
        n: usize,
        a: UnsafeCell<Vec<u64>>,
        b: UnsafeCell<Vec<u64>>,
        commits: Vec<AtomicU32>,
        stall: Duration,
        stalled: AtomicBool,
        caller: std::thread::ThreadId,
    }

    // SAFETY: `a` and `b` are written only in `commit`, once per element, under the pool's
    // protocol; read only after their operation is done.
    unsafe impl Sync for Squares {}

    impl Task for Squares {
        fn ops(&self) -> usize {
            2
        }
        fn chunks(&self, _: usize) -> usize {
            self.n
        }
        fn run(&self, op: usize, c: usize, scratch: &mut Scratch) {
            if op == 0 {
                // A little work, so that a helper woken by the job gets chunks of it.
                let until = Instant::now() + Duration::from_micros(20);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
                if std::thread::current().id() != self.caller && !self.stalled.swap(true, Ordering::AcqRel) {
                    std::thread::sleep(self.stall);
                }
            }
            scratch.f.clear();
            let v = if op == 0 {
                (c * c) as u64
            } else {
                // SAFETY: op 0 is done.
                unsafe { (&*self.a.get())[self.n - 1 - c] + 1 }
            };
            scratch.f.push(v as f32);
        }
        fn commit(&self, op: usize, c: usize, scratch: &Scratch) {
            self.commits[op * self.n + c].fetch_add(1, Ordering::Relaxed);
            let v = scratch.f[0] as u64;
            // SAFETY: one commit per chunk (the pool's protocol).
            unsafe {
                if op == 0 {
                    (&mut *self.a.get())[c] = v;
                } else {
                    (&mut *self.b.get())[c] = v;
                }
            }
        }
    }

    fn squares(n: usize, stall: Duration) -> Arc<Squares> {
        Arc::new(Squares {
            n,
            a: UnsafeCell::new(vec![0; n]),
            b: UnsafeCell::new(vec![0; n]),
            commits: (0..2 * n).map(|_| AtomicU32::new(0)).collect(),
            stall,
            stalled: AtomicBool::new(false),
            caller: std::thread::current().id(),
        })
    }

    #[test]
    fn every_chunk_commits_once_in_order_of_operations() {
        for threads in [1, 2, 4] {
            let pool = Pool::new(threads);
            for _ in 0..50 {
                let t = squares(37, Duration::ZERO);
                pool.run(t.clone());
                // SAFETY: the job is done.
                let b = unsafe { &*t.b.get() };
                assert!(b.iter().enumerate().all(|(i, &v)| v == ((36 - i) * (36 - i)) as u64 + 1), "{b:?}");
                assert!(t.commits.iter().all(|c| c.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn a_stalled_helper_holds_nobody_up() {
        // A helper stops in the middle of a chunk for 2 s (as a thread taken off its core
        // would): the caller computes that chunk again and the job ends long before.
        let pool = Pool::new(2);
        let mut waited = Duration::ZERO;
        for attempt in 0..20 {
            let t = squares(64, Duration::from_secs(2));
            let started = Instant::now();
            pool.run(t.clone());
            waited = started.elapsed();
            // SAFETY: the job is done.
            let b = unsafe { &*t.b.get() };
            assert!(b.iter().enumerate().all(|(i, &v)| v == ((63 - i) * (63 - i)) as u64 + 1));
            if t.stalled.load(Ordering::Acquire) {
                assert!(
                    waited < Duration::from_millis(500),
                    "attempt {attempt}: waited {waited:?} for a stalled helper"
                );
                assert!(pool.stolen_chunks() >= 1);
                return;
            }
        }
        panic!("no helper took a chunk in 20 jobs (last took {waited:?})");
    }
}
