//! Faults during training, through the binary as a user meets them: Ctrl-C (a checkpoint at
//! the next step boundary, a clean stop; a second one exits at once), SIGKILL at random
//! moments of training and saving (`KILN_KILLS`, default 6; `scripts/faults.sh` sends 100),
//! a disk that fills during a save (a file-size limit on the process: its writes fail as on a
//! full disk), and a second trainer on a run that is training (refused by the run's lock).
//! After each, the newest checkpoint loads and resuming gives exactly the losses of a run
//! that had no fault.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// A prepared corpus for these runs.
fn corpus(dir: &Path) -> PathBuf {
    let words = [
        "the", "king", "speaks", "to", "a", "fool", "in", "winter", "and", "sings",
    ];
    common::word_corpus(dir, &words, 21, 4000)
}

/// `kiln --backend reference train …` with the flags of these tests (the reference backend:
/// the same losses in every process), its output captured.
fn train(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(["--backend", "reference", "train", "--print-every", "1000"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

fn new_run(data: &Path, run: &Path, model: &str, extra: &[&str]) -> Command {
    let (data, run) = (data.to_str().unwrap(), run.to_str().unwrap());
    let mut args = vec![
        "--data", data, "--out", run, "--model", model, "--seed", "7",
    ];
    args.extend(extra);
    train(&args)
}

fn resume(run: &Path) -> Command {
    train(&["--resume", run.to_str().unwrap()])
}

/// Runs to the end; returns the status and standard error.
fn finish(mut command: Command) -> (ExitStatus, String) {
    let out = command.output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into())
}

fn wait(child: Child) -> (ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into())
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: a signal to our own child, which has not been reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// The steps the run's telemetry records, in order.
fn steps(run: &Path) -> Vec<(u64, f64)> {
    let Ok(text) = fs::read_to_string(run.join("telemetry.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["type"] == "step")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

/// Each step's loss as the run finally kept it (a step rerun after a fault, its last).
fn final_losses(run: &Path) -> BTreeMap<u64, f64> {
    steps(run).into_iter().collect()
}

/// Waits until the run's telemetry records more than `count` steps.
fn wait_for_steps(run: &Path, count: usize, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while steps(run).len() <= count {
        if child.try_wait().unwrap().is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            panic!("the run ended early: {err}");
        }
        assert!(Instant::now() < deadline, "no step after two minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// No partial checkpoint left beside the complete ones.
fn no_partial_checkpoints(run: &Path) {
    for entry in fs::read_dir(run.join("checkpoints")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !name.contains(".tmp"),
            "a partial checkpoint is left: {name}"
        );
    }
}

const TINY: [&str; 8] = [
    "--batch",
    "2",
    "--seq",
    "16",
    "--eval-every",
    "0",
    "--lr",
    "0.003",
];

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_run_resumes_exactly() {
    let dir = common::temp_dir("faults", "interrupt");
    let data = corpus(&dir);
    let mut flags = TINY.to_vec();
    flags.extend(["--steps", "2000", "--checkpoint-every", "100000"]);
    let straight = dir.join("straight");
    let (status, err) = finish(new_run(&data, &straight, "tiny-gqa", &flags));
    assert!(status.success(), "{err}");

    let run = dir.join("run");
    let mut child = new_run(&data, &run, "tiny-gqa", &flags).spawn().unwrap();
    wait_for_steps(&run, 2, &mut child);
    // A second trainer on the same run is refused while this one holds it.
    let (status, err) = finish(resume(&run));
    assert!(
        !status.success() && err.contains("being trained by another kiln process"),
        "{err}"
    );
    signal(&child, libc::SIGINT);
    let (status, err) = wait(child);
    assert!(status.success(), "{err}");
    assert!(err.contains("interrupted: stopped after step"), "{err}");
    let stopped = common::newest_loads(&run);
    assert!((3..2000).contains(&stopped), "stopped at step {stopped}");
    let (status, err) = finish(resume(&run));
    assert!(status.success(), "{err}");
    assert_eq!(
        final_losses(&run),
        final_losses(&straight),
        "interrupted at {stopped} and resumed"
    );
    fs::remove_dir_all(&dir).ok();
}

/// While the flag is set a second signal exits at once: in the middle of a step of about a
/// second, without the checkpoint the first asked for.
#[test]
fn a_second_ctrl_c_exits_at_once() {
    let dir = common::temp_dir("faults", "twice");
    let data = corpus(&dir);
    let mut config = kiln_core::config::ModelConfig::preset("tiny-gqa").unwrap();
    (config.dim, config.hidden_dim, config.n_layers) = (256, 1024, 4);
    (config.n_heads, config.n_kv_heads, config.head_dim) = (4, 2, 64);
    let model = dir.join("model.json");
    fs::write(&model, serde_json::to_string(&config).unwrap()).unwrap();
    let run = dir.join("run");
    let flags = [
        "--batch",
        "64",
        "--seq",
        "32",
        "--steps",
        "50",
        "--eval-every",
        "0",
    ];
    let mut flags = flags.to_vec();
    flags.extend(["--checkpoint-every", "100000"]);
    let mut child = new_run(&data, &run, model.to_str().unwrap(), &flags)
        .spawn()
        .unwrap();
    wait_for_steps(&run, 0, &mut child);
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(100));
    let sent = Instant::now();
    signal(&child, libc::SIGINT);
    let (status, err) = wait(child);
    let seconds = sent.elapsed().as_secs_f64();
    assert_eq!(status.code(), Some(kiln::interrupt::EXIT_AT_ONCE), "{err}");
    assert!(!err.contains("interrupted: stopped"), "{err}");
    assert!(seconds < 0.5, "{seconds:.2} s after the second signal");
    assert!(
        !run.join("checkpoints").exists()
            || kiln_formats::checkpoint::list(&run.join("checkpoints"))
                .unwrap()
                .is_empty()
    );
    fs::remove_dir_all(&dir).ok();
}

/// SIGKILL at random moments of a run that checkpoints every step: after each, the newest
/// checkpoint loads, and the run resumed to its end has the losses of one never killed.
#[test]
fn kills_never_leave_the_newest_checkpoint_unloadable() {
    let kills: usize = std::env::var("KILN_KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(6);
    let dir = common::temp_dir("faults", "kills");
    let data = corpus(&dir);
    // Room for every kill: a cycle runs a few steps (each a few ms) before its kill lands.
    let steps_total = 50 + 15 * kills;
    let total = steps_total.to_string();
    let mut flags = TINY.to_vec();
    flags.extend([
        "--steps",
        &total,
        "--checkpoint-every",
        "1",
        "--keep-last",
        "2",
    ]);
    let straight = dir.join("straight");
    let (status, err) = finish(new_run(&data, &straight, "tiny-gqa", &flags));
    assert!(status.success(), "{err}");

    let run = dir.join("run");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut landed = 0;
    for kill in 0..kills {
        let mut child = if kill == 0 {
            new_run(&data, &run, "tiny-gqa", &flags).spawn().unwrap()
        } else {
            resume(&run).spawn().unwrap()
        };
        // Once this process is training (a step past those before it), at a random moment
        // within the next few steps and their saves.
        let before = steps(&run).len();
        wait_for_steps(&run, before, &mut child);
        std::thread::sleep(Duration::from_micros(rng.random_range(0..20_000)));
        signal(&child, libc::SIGKILL);
        let (status, _) = wait(child);
        landed += (status.code().is_none()) as usize;
        common::newest_loads(&run);
    }
    assert_eq!(landed, kills, "every kill landed on a running process");
    let (status, err) = finish(resume(&run));
    assert!(status.success(), "{err}");
    // A kill between a step's checkpoint and its telemetry line loses that line (the step is
    // not rerun: its checkpoint holds it), so every step recorded must match, the last among
    // them, and at most one line may be missing per kill.
    let (got, want) = (final_losses(&run), final_losses(&straight));
    for (step, loss) in &got {
        assert_eq!(
            Some(loss),
            want.get(step),
            "step {step} after {kills} kills"
        );
    }
    assert_eq!(
        got.keys().last(),
        want.keys().last(),
        "the run reached its end"
    );
    assert!(
        got.len() + kills >= want.len(),
        "{} of {} steps recorded",
        got.len(),
        want.len()
    );
    no_partial_checkpoints(&run);
    println!("{kills} kills, each leaving a loadable newest checkpoint; resumed exactly");
    fs::remove_dir_all(&dir).ok();
}

/// A save that fails for want of space stops the run with a clear error; the previous
/// checkpoint stays whole and the partial one is removed; resuming later is exact.
#[test]
fn a_full_disk_during_a_save_keeps_the_previous_checkpoint() {
    let dir = common::temp_dir("faults", "full");
    let data = corpus(&dir);
    let mut flags = TINY.to_vec();
    flags.extend(["--steps", "4", "--checkpoint-every", "2"]);
    let (straight, run) = (dir.join("straight"), dir.join("run"));
    for run in [&straight, &run] {
        let (status, err) = finish(new_run(&data, run, "tiny-gqa", &flags));
        assert!(status.success(), "{err}");
    }
    let more = |run: &Path| {
        let mut command = resume(run);
        command.args(["--steps", "8"]);
        command
    };
    let (status, err) = finish(more(&straight));
    assert!(status.success(), "{err}");

    // The disk fills at two moments of the save: writes past 64 KiB fail (EFBIG, as ENOSPC
    // would), where telemetry fits and the checkpoint's 126 KB of weights do not; then past
    // 160 KiB, where the weights fit and the 253 KB of optimizer state do not. SIGXFSZ is
    // ignored, so the write returns the error.
    for limit in [64u64 << 10, 160 << 10] {
        let mut full = more(&run);
        // SAFETY: async-signal-safe calls only, in the child before it runs kiln.
        unsafe {
            full.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit);
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let (status, err) = finish(full);
        assert!(!status.success(), "the save cannot have succeeded: {err}");
        assert!(
            err.contains("cannot write checkpoint") && err.contains("intact"),
            "limit {limit}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(common::newest_loads(&run), 4, "limit {limit}");
        no_partial_checkpoints(&run);
    }
    let (status, err) = finish(more(&run));
    assert!(status.success(), "{err}");
    assert_eq!(final_losses(&run), final_losses(&straight));
    fs::remove_dir_all(&dir).ok();
}
