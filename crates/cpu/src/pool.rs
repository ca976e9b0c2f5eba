//! A persistent thread pool for the CPU backend's kernels.
//!
//! - The calling thread takes part: a pool of `threads` runs `threads − 1` workers.
//! - Work goes out as task indices from an atomic counter, one at a time, not as static
//!   halves: when another process holds one core, the free thread takes the tasks the busy one
//!   cannot (FACTS: a static 50/50 split runs at the slow thread's speed).
//! - Idle workers spin briefly on the job counter, then park on a condition variable, so an
//!   idle pool costs no CPU and a burst of kernels does not pay a wake-up each.
//! - There is no barrier between kernels: `run` returns when its own tasks are done.
//!
//! Each job lives in its own `Arc`, with its own task counter, so a worker that is late
//! for one job can never claim a task of the next one with the old job's closure.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker polls for new work before it parks. Kernels of one training step
/// follow each other within microseconds, so a short spin keeps the workers hot through a
/// step without burning a core between steps.
const SPIN: Duration = Duration::from_micros(200);

/// The runs of [`ThreadPool::stream_ranges`], worked out per task (no list is allocated: the
/// few-row products of decoding ask for them on every product).
#[derive(Clone, Copy, Debug)]
pub struct StreamRanges {
    n: usize,
    big: usize,
    small: usize,
    bigs: usize,
    tasks: usize,
}

impl StreamRanges {
    /// How many runs (tasks).
    pub fn len(&self) -> usize {
        self.tasks
    }

    pub fn is_empty(&self) -> bool {
        self.tasks == 0
    }

    /// Run `t`: the long ones first, then the small ones.
    pub fn get(&self, t: usize) -> std::ops::Range<usize> {
        let start = if t < self.bigs {
            t * self.big
        } else {
            self.bigs * self.big + (t - self.bigs) * self.small
        };
        let len = if t < self.bigs { self.big } else { self.small };
        start..(start + len).min(self.n)
    }
}

/// One `run` call: a closure over task indices, and its counters.
struct Job {
    /// The closure, type-erased; valid until `done` reaches `tasks` (the caller waits).
    task: *const (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
}

// SAFETY: `task` points to a `Sync` closure that the caller of `run` keeps alive until every
// task has finished; workers only call it for indices they claimed below `tasks`.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            // SAFETY: `i < tasks`, so the job is not finished and `run` still holds the
            // closure alive (it waits for `done == tasks`).
            unsafe { (*self.task)(i) };
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct State {
    job: Option<Arc<Job>>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Bumped for every job, so spinning workers notice new work without the lock.
    epoch: AtomicU64,
}

/// See the module docs.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    threads: usize,
}

impl ThreadPool {
    /// A pool of `threads` threads in all, the caller included (at least 1).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                job: None,
                shutdown: false,
            }),
            wake: Condvar::new(),
            epoch: AtomicU64::new(0),
        });
        let workers = (1..threads)
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("kiln-cpu-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawn a pool worker")
            })
            .collect();
        ThreadPool {
            shared,
            workers,
            threads,
        }
    }

    /// The threads that run tasks, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `task(i)` for every `i` in `0..tasks` across the pool and returns when all have
    /// finished. Tasks run in any order, each exactly once.
    /// `0..n` cut for a streaming kernel (the few-row products): one long run per thread
    /// covering three quarters of `n`, then the last quarter in runs of a sixteenth of a
    /// thread's share, every boundary a multiple of `align`. Long runs stream best (two
    /// threads read stories110M's f32 weights at 57–61 GB/s in halves, 38–45 in eight runs;
    /// Zen 5), and the small runs at the end still let a free thread take over from one held
    /// up by another process (FACTS: a static split runs at the slow thread's speed), as
    /// OpenMP's guided schedule does.
    pub fn stream_ranges(&self, n: usize, align: usize) -> StreamRanges {
        let threads = self.threads();
        let big = (n * 3 / (4 * threads)).next_multiple_of(align).max(align);
        let small = (n / (16 * threads)).max(1).next_multiple_of(align);
        let bigs = threads.min(n.div_ceil(big));
        let covered = (bigs * big).min(n);
        StreamRanges {
            n,
            big,
            small,
            bigs,
            tasks: bigs + (n - covered).div_ceil(small),
        }
    }

    pub fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.threads == 1 {
            (0..tasks).for_each(task);
            return;
        }
        // SAFETY (lifetime erasure): the job's pointer is used only while tasks remain, and
        // this function does not return before `done == tasks`.
        let task: *const (dyn Fn(usize) + Sync + '_) = task;
        let task: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(task) };
        let job = Arc::new(Job {
            task,
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
        });
        {
            let mut state = self.shared.state.lock().expect("pool lock");
            state.job = Some(job.clone());
            self.shared.epoch.fetch_add(1, Ordering::Release);
        }
        self.shared.wake.notify_all();
        job.work();
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < tasks {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let mut state = self.shared.state.lock().expect("pool lock");
        if state.job.as_ref().is_some_and(|j| Arc::ptr_eq(j, &job)) {
            state.job = None;
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.state.lock().expect("pool lock").shutdown = true;
        self.shared.epoch.fetch_add(1, Ordering::Release);
        self.shared.wake.notify_all();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0u64;
    loop {
        // Spin a little for the next job before parking.
        let started = Instant::now();
        while shared.epoch.load(Ordering::Acquire) == seen && started.elapsed() < SPIN {
            std::hint::spin_loop();
        }
        let job = {
            let mut state = shared.state.lock().expect("pool lock");
            while shared.epoch.load(Ordering::Acquire) == seen && !state.shutdown {
                state = shared.wake.wait(state).expect("pool lock");
            }
            if state.shutdown {
                return;
            }
            seen = shared.epoch.load(Ordering::Acquire);
            state.job.clone()
        };
        if let Some(job) = job {
            job.work();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once_across_many_jobs() {
        let pool = ThreadPool::new(3);
        for tasks in [0, 1, 2, 7, 100, 1000] {
            let counts: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            pool.run(tasks, &|i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "{tasks} tasks"
            );
        }
    }

    #[test]
    fn a_slow_task_does_not_hold_the_others() {
        // One task sleeps; with dynamic hand-out the other threads finish the rest meanwhile.
        let pool = ThreadPool::new(2);
        let done = AtomicU32::new(0);
        let started = Instant::now();
        pool.run(41, &|i| {
            if i == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 41);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn jobs_after_idle_periods_still_run() {
        let pool = ThreadPool::new(2);
        for _ in 0..3 {
            std::thread::sleep(SPIN * 3);
            let sum = AtomicUsize::new(0);
            pool.run(64, &|i| {
                sum.fetch_add(i, Ordering::Relaxed);
            });
            assert_eq!(sum.load(Ordering::Relaxed), 64 * 63 / 2);
        }
    }

    /// The streaming ranges cover 0..n in order without gaps, every boundary but the end
    /// aligned, one long run per thread first.
    #[test]
    fn stream_ranges_cover_in_aligned_runs() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            for (n, align) in [(768, 4), (2048, 64), (32000, 4), (7, 4), (100, 1), (1, 1)] {
                let stream = pool.stream_ranges(n, align);
                let ranges: Vec<_> = (0..stream.len()).map(|t| stream.get(t)).collect();
                let mut at = 0;
                for r in &ranges {
                    assert_eq!(r.start, at, "{n} {align}: a gap");
                    assert!(r.end > r.start && (r.end == n || r.end % align == 0));
                    at = r.end;
                }
                assert_eq!(at, n);
                if n >= 64 * threads {
                    let first: usize = ranges.iter().take(threads).map(|r| r.len()).sum();
                    assert!(first * 4 >= n * 2, "{n}: the first runs hold {first}");
                }
            }
        }
    }
}
