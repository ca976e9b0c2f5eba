//! Training across processes under `mpirun` (Open MPI; built with `--features mpi`, which
//! `.ci/run` installs and tests): the processes together give the losses of one process with
//! as many micro-batches, a run resumes with another number of processes only where the data
//! order stays the same, a process that hangs or dies stops the others instead of leaving
//! them waiting, and data too small for the processes is refused.
#![cfg(feature = "mpi")]

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A prepared corpus for these runs.
fn corpus(dir: &Path) -> PathBuf {
    let words = [
        "a", "rank", "sums", "the", "gradient", "of", "its", "batch", "and", "waits",
    ];
    common::word_corpus(dir, &words, 5, 6000)
}

/// The flags of every run here: the cpu backend in f32 on one thread per process, so that
/// the only difference between a run of several processes and one of several micro-batches
/// is the order of the gradient sum.
const FLAGS: [&str; 12] = [
    "--model",
    "tiny-gqa",
    "--seq",
    "32",
    "--seed",
    "11",
    "--eval-every",
    "0",
    "--lr",
    "0.003",
    "--print-every",
    "1000",
];

/// `kiln --backend cpu --precision f32 train …`, under `mpirun -np N` when `processes` is
/// given; `mark` is set in the environment, to find the processes again.
fn train(processes: Option<usize>, args: &[&str], mark: &str) -> Command {
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let mut command = match processes {
        Some(n) => {
            let mut c = Command::new("mpirun");
            c.args([
                "--oversubscribe",
                "--bind-to",
                "none",
                "-np",
                &n.to_string(),
                kiln,
            ]);
            c
        }
        None => Command::new(kiln),
    };
    command
        .args(["--backend", "cpu", "--precision", "f32", "train"])
        .args(FLAGS)
        .args(args)
        .env("KILN_THREADS", "1")
        .env("KILN_TEST_MARK", mark)
        .env("RUST_BACKTRACE", "0")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Containers often forbid cross-memory attach; copies through shared memory work.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdin(Stdio::null());
    command
}

/// A started command whose output goes to a file (no pipe to fill while it runs).
struct Running {
    child: Child,
    log: PathBuf,
}

/// What a command did: its status and everything it printed.
struct Output {
    status: ExitStatus,
    text: String,
}

fn start(mut command: Command, log: PathBuf) -> Running {
    let file = fs::File::create(&log).unwrap();
    command.stdout(file.try_clone().unwrap()).stderr(file);
    let child = command.spawn().expect("mpirun (install openmpi-bin)");
    Running { child, log }
}

impl Running {
    /// Waits until the run's telemetry has `count` steps (two minutes at most).
    fn wait_for_steps(&mut self, run: &Path, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while events(run, "step").len() < count {
            if self.child.try_wait().unwrap().is_some() {
                panic!(
                    "the run ended early:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "not {count} steps in two minutes"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the end, at most five minutes: a run that hangs fails the test instead of
    /// holding CI until its own limit.
    fn finish(mut self) -> Output {
        let deadline = Instant::now() + Duration::from_secs(300);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "still running after five minutes:\n{}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Output {
            status,
            text: fs::read_to_string(&self.log).unwrap_or_default(),
        }
    }
}

/// Runs `command` to its end (logging beside the runs in `dir`).
fn run(command: Command, dir: &Path) -> Output {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    start(command, dir.join(format!("command-{n}.log"))).finish()
}

fn text(output: &Output) -> &str {
    &output.text
}

/// A new run's flags, with `extra` (`--batch 2` unless `extra` gives one).
fn new_run(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--data".to_string(),
        data.display().to_string(),
        "--out".to_string(),
        out.display().to_string(),
    ];
    if !extra.contains(&"--batch") {
        args.extend(["--batch".to_string(), "2".to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The run's telemetry events of `kind`, in order.
fn events(run: &Path, kind: &str) -> Vec<serde_json::Value> {
    fs::read_to_string(run.join("telemetry.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["type"] == kind)
        .collect()
}

/// `(loss, gradient norm)` of each step, in order.
fn curve(run: &Path) -> Vec<(f64, f64)> {
    events(run, "step")
        .iter()
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Two `(loss, gradient norm)` pairs equal up to the order of the sums: f32 rounding, 2⁻²⁴
/// relative per addition, grown through a few steps of Adam. Measured on a Zen 5: at most
/// 9e-8 relative in the loss (one process sums its micro-batches' losses in f32) and 2e-8 in
/// the gradient norm over six steps; 1e-5 leaves a hundredfold room for other CPUs and orders
/// and stays far below one step's change in the loss (~1e-2).
fn close((la, na): (&f64, &f64), (lb, nb): (&f64, &f64), what: &str) {
    assert!(
        (la - lb).abs() <= 1e-5 * lb.abs() && (na - nb).abs() <= 1e-5 * nb.abs(),
        "{what}: loss {la} against {lb}, gradient norm {na} against {nb}"
    );
}

#[test]
fn processes_give_the_losses_of_one_process_with_as_many_micro_batches() {
    let dir = common::temp_dir("mpi", "accum");
    let data = corpus(&dir);
    for n in [2usize, 3] {
        let (together, alone) = (dir.join(format!("np{n}")), dir.join(format!("accum{n}")));
        let out = run(
            train(
                Some(n),
                &refs(&new_run(&data, &together, &["--steps", "6"])),
                "accum",
            ),
            &dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        let accum = n.to_string();
        let out = run(
            train(
                None,
                &refs(&new_run(
                    &data,
                    &alone,
                    &["--steps", "6", "--accum", &accum],
                )),
                "accum",
            ),
            &dir,
        );
        assert!(out.status.success(), "{}", text(&out));
        let (a, b) = (curve(&together), curve(&alone));
        assert_eq!((a.len(), b.len()), (6, 6));
        for (step, ((la, na), (lb, nb))) in a.iter().zip(&b).enumerate() {
            // The processes' sums are added in another order than one process adds its
            // micro-batches' gradients (the embedding's, token by token): see `close`.
            close(
                (la, na),
                (lb, nb),
                &format!("step {}, {n} processes", step + 1),
            );
        }
        // Rank 0 alone wrote the run, and says how many processes trained it.
        let starts = events(&together, "start");
        assert_eq!(starts.len(), 1, "one start event");
        assert_eq!(starts[0]["world_size"], n);
        assert_eq!(starts[0]["tokens_per_step"], 2 * 32 * n);
        let steps = events(&together, "step");
        assert!(steps
            .iter()
            .all(|s| s["ms"]["allreduce"].as_f64().unwrap() > 0.0));
        let train_json: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(together.join("train.json")).unwrap())
                .unwrap();
        assert_eq!(train_json["world_size"], n);
    }
}

#[test]
fn a_run_resumes_with_another_number_of_processes_only_in_the_same_data_order() {
    let dir = common::temp_dir("mpi", "resume");
    let data = corpus(&dir);
    let (straight, split) = (dir.join("straight"), dir.join("split"));
    let eight = ["--steps", "8", "--checkpoint-every", "4"];
    let out = run(
        train(Some(2), &refs(&new_run(&data, &straight, &eight)), "r"),
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));
    let four = ["--steps", "4", "--checkpoint-every", "4"];
    let out = run(
        train(Some(2), &refs(&new_run(&data, &split, &four)), "r"),
        &dir,
    );
    assert!(out.status.success(), "{}", text(&out));

    // Three processes cannot share two batches per step: refused, nothing written.
    let resume = ["--resume", split.to_str().unwrap(), "--steps", "8"];
    let out = run(train(Some(3), &resume, "r"), &dir);
    assert!(!out.status.success());
    assert!(text(&out).contains("cannot share evenly"), "{}", text(&out));
    assert_eq!(events(&split, "step").len(), 4);

    // One process takes both batches of each step: the same losses as the straight run.
    let out = run(train(None, &resume, "r"), &dir);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("the same batches in the same order"));
    let (a, b) = (curve(&split), curve(&straight));
    assert_eq!(a.len(), 8);
    assert_eq!(a[..4], b[..4], "the steps before the resume");
    for (step, ((la, na), (lb, nb))) in a.iter().zip(&b).enumerate().skip(4) {
        close(
            (la, na),
            (lb, nb),
            &format!("step {} after the resume", step + 1),
        );
    }
}

/// The pid of rank `rank` of the processes started with `KILN_TEST_MARK=mark`.
fn find_rank(mark: &str, rank: usize) -> Option<i32> {
    let want = [
        format!("KILN_TEST_MARK={mark}"),
        format!("OMPI_COMM_WORLD_RANK={rank}"),
    ];
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(environ) = fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
        if want.iter().all(|w| vars.contains(&w.as_bytes())) {
            return Some(pid);
        }
    }
    None
}

/// Starts a long two-process run, waits for three steps, sends `signal` to rank 1, and
/// returns mpirun's output and how long it took to stop after the signal.
fn fault(name: &str, signal: i32) -> (Output, Duration, PathBuf) {
    let dir = common::temp_dir("mpi", name);
    let data = corpus(&dir);
    let out = dir.join("run");
    let mark = format!("{name}-{}", std::process::id());
    let args = new_run(
        &data,
        &out,
        &[
            "--steps",
            "100000",
            "--checkpoint-every",
            "2",
            "--rank-timeout",
            "3s",
        ],
    );
    let mut running = start(train(Some(2), &refs(&args), &mark), dir.join("mpirun.log"));
    running.wait_for_steps(&out, 3);
    let pid = find_rank(&mark, 1).expect("rank 1's process");
    // SAFETY: a signal to a process this test started (through mpirun).
    unsafe { libc::kill(pid, signal) };
    let sent = Instant::now();
    let output = running.finish();
    let took = sent.elapsed();
    // SAFETY: as above; the process is normally gone already.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    (output, took, out)
}

#[test]
fn a_hung_process_stops_the_others_after_the_rank_timeout() {
    let (output, took, run) = fault("hang", libc::SIGSTOP);
    let said = text(&output);
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("no answer from the other processes for 3 s"),
        "{said}"
    );
    // The timeout (3 s) plus MPI's teardown; without the timeout rank 0 waits forever.
    assert!(took < Duration::from_secs(60), "stopped after {took:?}");
    assert!(common::newest_loads(&run) >= 2);
}

#[test]
fn a_killed_process_stops_the_others() {
    let (output, took, run) = fault("kill", libc::SIGKILL);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(took < Duration::from_secs(60), "stopped after {took:?}");
    assert!(common::newest_loads(&run) >= 2);
}

#[test]
fn ctrl_c_to_mpirun_stops_every_process_at_one_step_with_a_checkpoint() {
    let dir = common::temp_dir("mpi", "ctrl-c");
    let data = corpus(&dir);
    let out = dir.join("run");
    let args = new_run(
        &data,
        &out,
        &["--steps", "100000", "--checkpoint-every", "100000"],
    );
    let mut running = start(
        train(Some(2), &refs(&args), "ctrl-c"),
        dir.join("mpirun.log"),
    );
    running.wait_for_steps(&out, 3);
    // mpirun passes the signal on to every process; they agree on the step to stop at.
    // SAFETY: a signal to our own child, which has not been reaped.
    unsafe { libc::kill(running.child.id() as i32, libc::SIGINT) };
    let output = running.finish();
    let stopped = events(&out, "stopped");
    assert_eq!(stopped.len(), 1, "{}", text(&output));
    assert_eq!(stopped[0]["reason"], "interrupted");
    let step = stopped[0]["step"].as_u64().unwrap();
    assert_eq!(common::newest_loads(&out), step);
    // And the run goes on from there.
    let more = (step + 2).to_string();
    let resume = ["--resume", out.to_str().unwrap(), "--steps", more.as_str()];
    let output = run(train(Some(2), &resume, "ctrl-c"), &dir);
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(events(&out, "step").last().unwrap()["step"], step + 2);
}

#[test]
fn a_time_budget_ends_every_process_at_the_same_step() {
    let dir = common::temp_dir("mpi", "time");
    let data = corpus(&dir);
    let out = dir.join("run");
    // Each process's own clock would end them at different steps, the one still training
    // waiting for the other: they take rank 0's.
    let output = run(
        train(
            Some(2),
            &refs(&new_run(&data, &out, &["--time", "2s"])),
            "time",
        ),
        &dir,
    );
    assert!(output.status.success(), "{}", text(&output));
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let last = events(&out, "step").last().unwrap()["step"].clone();
    assert_eq!(report["steps"], last);
    assert!(last.as_u64().unwrap() > 3);
}

#[test]
fn processes_started_with_different_settings_are_stopped_at_the_start() {
    let dir = common::temp_dir("mpi", "replicas");
    let data = corpus(&dir);
    let out = dir.join("run");
    // mpirun's MPMD form: rank 0 with seed 11 (FLAGS), rank 1 with seed 12, so different
    // weights from the start.
    let mut command = train(
        Some(1),
        &refs(&new_run(&data, &out, &["--steps", "3"])),
        "rep",
    );
    command
        .arg(":")
        .args(["-np", "1", env!("CARGO_BIN_EXE_kiln")]);
    command
        .args(["--backend", "cpu", "--precision", "f32", "train"])
        .args(refs(&new_run(&data, &out, &["--steps", "3"])))
        .args(FLAGS.iter().map(|f| if *f == "11" { "12" } else { f }));
    let output = run(command, &dir);
    assert!(!output.status.success());
    assert!(
        text(&output)
            .contains("hold different weights, steps, data positions or settings at the start"),
        "{}",
        text(&output)
    );
    assert!(events(&out, "step").is_empty());
}

#[test]
fn data_too_small_for_the_processes_is_refused() {
    let dir = common::temp_dir("mpi", "small");
    let data = corpus(&dir);
    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(data.join("data.json")).unwrap()).unwrap();
    // Sequences of 32 so that the training split holds exactly one batch.
    let tokens = manifest["train_tokens"].as_u64().unwrap();
    let batch = ((tokens - 1) / 32).to_string();
    let args = new_run(
        &data,
        &dir.join("run"),
        &["--steps", "1", "--batch", &batch],
    );
    let out = run(train(Some(2), &refs(&args), "small"), &dir);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("holds 1 batches") && text(&out).contains("fewer than the 2"),
        "{}",
        text(&out)
    );
    // Refused before anything is written: the same --out can be used again.
    assert!(!dir.join("run/train.json").exists());
}
