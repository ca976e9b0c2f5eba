//! Training across processes: which launcher started this process, and, with the `mpi`
//! feature, the MPI communicator that sums the gradient arena over the processes (Open MPI or
//! MPICH, started by `mpirun -np N kiln train …`).
//!
//! A collective that gets no answer within the run's rank timeout stops every process with
//! MPI_Abort and says so: a process that hangs (or dies under a launcher that does not reap
//! the others) must not leave the rest waiting forever.

use std::time::Duration;

use anyhow::{bail, Result};

/// The number of processes a launcher started together with this one, from its environment
/// (Open MPI's `OMPI_COMM_WORLD_SIZE`, MPICH's and Intel MPI's `PMI_SIZE`); `None` when no
/// launcher started this process.
pub fn launched_world() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
}

/// What this kiln has for training across processes, for `kiln doctor`: the MPI library it
/// was built against, or how to build it with one.
pub fn describe() -> String {
    #[cfg(feature = "mpi")]
    {
        // MPI_Get_library_version may be called before MPI is initialized (MPI 3.0, 8.1.2).
        match mpi::environment::library_version() {
            Ok(v) => format!("MPI compiled in: {}", v.lines().next().unwrap_or("").trim()),
            Err(_) => "MPI compiled in (its version string is not UTF-8)".into(),
        }
    }
    #[cfg(not(feature = "mpi"))]
    {
        "no MPI in this build (cargo build --release --features mpi)".into()
    }
}

/// The processes this one trains with, joined at start-up; `None` alone (no launcher, or a
/// launcher's world of one).
pub fn join(rank_timeout: Duration) -> Result<Option<Team>> {
    match launched_world() {
        None | Some(1) => Ok(None),
        Some(size) => Team::join(size, rank_timeout).map(Some),
    }
}

#[cfg(not(feature = "mpi"))]
mod team {
    use super::*;
    use kiln_core::backend::{Backend, Communicator};

    /// Never made: this kiln has no MPI (see [`Team::join`]).
    pub enum Team {}

    impl Team {
        pub(super) fn join(size: usize, _rank_timeout: Duration) -> Result<Team> {
            bail!(
                "a launcher started {size} kiln processes, but this kiln was built without MPI: \
                 rebuild it with `cargo build --release --features mpi` (needs Open MPI or \
                 MPICH, and libclang: `apt-get install libopenmpi-dev openmpi-bin \
                 libclang-dev`)"
            )
        }

        pub fn rank(&self) -> usize {
            match *self {}
        }

        pub fn size(&self) -> usize {
            match *self {}
        }

        pub fn communicator<B: Backend>(&self) -> Box<dyn Communicator<B> + Send> {
            match *self {}
        }

        pub fn abort(&self, _code: i32) -> ! {
            match *self {}
        }
    }
}

#[cfg(feature = "mpi")]
mod team {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;

    use super::*;
    use kiln_core::backend::{Backend, BackendError, Communicator, HostReduce, View};
    use mpi::collective::{CommunicatorCollectives, SystemOperation};
    use mpi::environment::Universe;
    use mpi::request::{Request, Scope};
    use mpi::topology::{Communicator as _, SimpleCommunicator};
    use mpi::Threading;

    /// The gradient arena goes through the all-reduce in pieces of this many values (4 MiB),
    /// so the host copies stay small whatever the model's size.
    const CHUNK: usize = 1 << 20;

    /// MPI, initialized, with this process's place in it. Dropping it finalizes MPI.
    pub struct Team {
        universe: Universe,
        rank: usize,
        size: usize,
        rank_timeout: Duration,
    }

    impl Team {
        pub(super) fn join(size: usize, rank_timeout: Duration) -> Result<Team> {
            // Only the thread that trains calls MPI (a data-parallel run has no dashboard).
            let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
                bail!("MPI was already initialized in this process");
            };
            let world = universe.world();
            let team = Team {
                rank: world.rank() as usize,
                size: world.size() as usize,
                universe,
                rank_timeout,
            };
            if team.size != size {
                bail!(
                    "the launcher's environment says {size} processes, MPI says {}",
                    team.size
                );
            }
            Ok(team)
        }

        pub fn rank(&self) -> usize {
            self.rank
        }

        pub fn size(&self) -> usize {
            self.size
        }

        pub fn communicator<B: Backend>(&self) -> Box<dyn Communicator<B> + Send> {
            Box::new(Mpi {
                world: World(self.universe.world()),
                rank: self.rank,
                size: self.size,
                rank_timeout: self.rank_timeout,
                step: AtomicU64::new(0),
            })
        }

        /// Stops every process of the run (MPI_Abort) with exit status `code`.
        pub fn abort(&self, code: i32) -> ! {
            self.universe.world().abort(code)
        }
    }

    /// `MPI_COMM_WORLD`. Its handle may move to the thread that trains: MPI was initialized
    /// for one calling thread at a time, and only the trainer calls it.
    struct World(SimpleCommunicator);

    // SAFETY: see `World`: the handle is a plain value, and MPI is called from one thread.
    unsafe impl Send for World {}

    /// The communicator over MPI: the gradient arena summed in place in pieces, each piece a
    /// non-blocking all-reduce that this process polls until it completes or the rank timeout
    /// passes.
    struct Mpi {
        world: World,
        rank: usize,
        size: usize,
        rank_timeout: Duration,
        /// The optimizer step under way, for the timeout's message.
        step: AtomicU64,
    }

    impl Mpi {
        /// Waits for `request`, testing it (which is also what moves MPI's progress along),
        /// first in a spin, then with short sleeps; gives up after the rank timeout.
        fn wait<'a, D: ?Sized, S: Scope<'a>>(&self, mut request: Request<'a, D, S>, what: &str) {
            let started = Instant::now();
            for spin in 0u64.. {
                match request.test() {
                    Ok(_) => return,
                    Err(pending) => request = pending,
                }
                if spin > 2000 {
                    std::thread::sleep(Duration::from_micros(50));
                    if started.elapsed() > self.rank_timeout {
                        self.give_up(what, started.elapsed());
                    }
                } else {
                    std::hint::spin_loop();
                }
            }
        }

        fn give_up(&self, what: &str, waited: Duration) -> ! {
            eprintln!(
                "kiln process {} of {}: no answer from the other processes for {:.0} s in {what} \
                 at step {}: one of them died or hangs. Stopping all of them; the last \
                 checkpoint is intact (raise --rank-timeout if a step can take that long).",
                self.rank,
                self.size,
                waited.as_secs_f64(),
                self.step.load(Ordering::Relaxed)
            );
            self.world.0.abort(3)
        }
    }

    impl<B: Backend> Communicator<B> for Mpi {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.size
        }

        fn all_reduce_sum(&self, backend: &B, buffer: View<B>) -> Result<(), BackendError> {
            let mut mine = vec![0f32; CHUNK.min(buffer.len())];
            let mut sum = mine.clone();
            let mut start = 0;
            while start < buffer.len() {
                let len = CHUNK.min(buffer.len() - start);
                let piece = buffer.slice(start, len);
                backend.download(piece, &mut mine[..len])?;
                mpi::request::scope(|scope| {
                    let request = self.world.0.immediate_all_reduce_into(
                        scope,
                        &mine[..len],
                        &mut sum[..len],
                        SystemOperation::sum(),
                    );
                    self.wait(request, "the gradient all-reduce");
                });
                backend.upload(piece, &sum[..len])?;
                start += len;
            }
            Ok(())
        }

        fn all_reduce_host(&self, values: &mut [f64], op: HostReduce) -> Result<(), BackendError> {
            let mine = values.to_vec();
            let op = match op {
                HostReduce::Sum => SystemOperation::sum(),
                HostReduce::Min => SystemOperation::min(),
                HostReduce::Max => SystemOperation::max(),
            };
            mpi::request::scope(|scope| {
                let request = self
                    .world
                    .0
                    .immediate_all_reduce_into(scope, &mine[..], values, op);
                self.wait(request, "the step's agreement");
            });
            Ok(())
        }

        fn at_step(&self, step: u64) {
            self.step.store(step, Ordering::Relaxed);
        }
    }
}

pub use team::Team;
