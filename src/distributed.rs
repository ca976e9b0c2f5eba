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

/// Where a process started by `kiln train --gpus N` stands: its rank, the world size, and the
/// file the processes meet at (the environment the launcher gave it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuPlace {
    pub rank: usize,
    pub size: usize,
    pub id_file: std::path::PathBuf,
}

/// The variables `kiln train --gpus N` sets on each process it starts.
pub const GPU_RANK: &str = "KILN_GPU_RANK";
pub const GPU_WORLD: &str = "KILN_GPU_WORLD";
pub const GPU_ID_FILE: &str = "KILN_GPU_ID_FILE";

/// This process's place when `kiln train --gpus N` started it; `None` otherwise.
pub fn gpu_place() -> Option<GpuPlace> {
    let rank = std::env::var(GPU_RANK).ok()?.parse().ok()?;
    let size = std::env::var(GPU_WORLD).ok()?.parse().ok()?;
    let id_file = std::env::var_os(GPU_ID_FILE)?.into();
    Some(GpuPlace {
        rank,
        size,
        id_file,
    })
}

/// `kiln train --gpus N …`: starts N copies of this command (without `--gpus`), one per GPU,
/// each seeing only its own (`CUDA_VISIBLE_DEVICES`, narrowing the caller's list if it set
/// one), told its rank through the environment; waits for them all. When one fails, the
/// others are stopped (they would wait in a collective forever) and the failure is the
/// error. `program` and `args` are the command to start (this executable and its arguments,
/// for kiln; tests start others).
pub fn launch_gpus(
    gpus: usize,
    program: &std::path::Path,
    args: &[std::ffi::OsString],
    visible: Option<&str>,
) -> Result<()> {
    use std::process::{Command, Stdio};
    anyhow::ensure!(gpus >= 1, "--gpus must be at least 1");
    let devices: Vec<String> = match visible {
        Some(list) => list
            .split(',')
            .map(|d| d.trim().to_string())
            .filter(|d| !d.is_empty())
            .collect(),
        None => (0..gpus).map(|i| i.to_string()).collect(),
    };
    anyhow::ensure!(
        devices.len() >= gpus,
        "--gpus {gpus}: CUDA_VISIBLE_DEVICES lists only {} device(s)",
        devices.len()
    );
    let meeting = std::env::temp_dir().join(format!("kiln-gpus-{}", std::process::id()));
    std::fs::create_dir_all(&meeting)?;
    let id_file = meeting.join("nccl-id");
    let _ = std::fs::remove_file(&id_file);
    let mut children = Vec::with_capacity(gpus);
    for (rank, device) in devices.iter().take(gpus).enumerate() {
        let child = Command::new(program)
            .args(args)
            .env(GPU_RANK, rank.to_string())
            .env(GPU_WORLD, gpus.to_string())
            .env(GPU_ID_FILE, &id_file)
            .env("CUDA_VISIBLE_DEVICES", device)
            .stdin(Stdio::null())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("cannot start the process for GPU {rank}: {e}");
            }
        }
    }
    // Wait for all; the first failure stops the rest.
    let mut failed: Option<(usize, std::process::ExitStatus)> = None;
    let mut running: Vec<Option<std::process::Child>> = children.into_iter().map(Some).collect();
    while running.iter().any(Option::is_some) {
        for (rank, slot) in running.iter_mut().enumerate() {
            if let Some(child) = slot {
                if let Some(status) = child.try_wait()? {
                    *slot = None;
                    if !status.success() && failed.is_none() {
                        failed = Some((rank, status));
                    }
                }
            }
        }
        if failed.is_some() {
            for child in running.iter_mut().flatten() {
                let _ = child.kill();
                let _ = child.wait();
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_dir_all(&meeting);
    match failed {
        Some((rank, status)) => bail!(
            "the process on GPU {rank} of {gpus} failed ({status}); the others were stopped, and \
             the last checkpoint is intact"
        ),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::path::Path;

    fn sh(script: &str) -> Vec<OsString> {
        vec!["-c".into(), script.into()]
    }

    #[test]
    fn each_gpu_process_is_told_its_rank_and_sees_its_own_device() {
        let dir = std::env::temp_dir().join(format!("kiln-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            "echo $KILN_GPU_RANK $KILN_GPU_WORLD $CUDA_VISIBLE_DEVICES > {}/$KILN_GPU_RANK; \
             test -n \"$KILN_GPU_ID_FILE\"",
            dir.display()
        );
        launch_gpus(2, Path::new("sh"), &sh(&script), Some("4, 5,6")).unwrap();
        let read = |r: &str| std::fs::read_to_string(dir.join(r)).unwrap();
        assert_eq!(read("0").trim(), "0 2 4");
        assert_eq!(read("1").trim(), "1 2 5");
        let err = launch_gpus(3, Path::new("sh"), &sh("true"), Some("0,1")).unwrap_err();
        assert!(err.to_string().contains("lists only 2"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_failing_process_stops_the_others_and_is_the_error() {
        let started = std::time::Instant::now();
        // Rank 1 fails at once; rank 0 would wait a minute (as in a collective) if not stopped.
        let script = "if [ \"$KILN_GPU_RANK\" = 1 ]; then exit 3; fi; sleep 60";
        let err = launch_gpus(2, Path::new("sh"), &sh(script), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GPU 1 of 2 failed") && err.contains("intact"),
            "{err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "rank 0 was not stopped: {:?}",
            started.elapsed()
        );
    }
}
