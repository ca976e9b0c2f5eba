//! Helpers the integration tests share: a fresh temporary directory and a small corpus of
//! pseudo-random words prepared with a trained BPE.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_formats::data::{prepare, TokenizerSpec};

/// An empty directory `kiln-{suite}-{name}-{pid}` under the system's temporary directory.
pub fn temp_dir(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-{suite}-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// `count` words drawn from `words` by a fixed linear congruential generator from `seed`,
/// nine to a line, written to one file under `dir` and prepared with a 320-token BPE; returns
/// the prepared directory.
pub fn word_corpus(dir: &Path, words: &[&str], seed: u64, count: usize) -> PathBuf {
    let mut state = seed;
    let mut text = String::new();
    for i in 0..count {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(words[(state >> 33) as usize % words.len()]);
        text.push(if i % 9 == 8 { '\n' } else { ' ' });
    }
    let input = dir.join("text");
    fs::create_dir_all(&input).unwrap();
    fs::write(input.join("a.txt"), &text).unwrap();
    let out = dir.join("data");
    prepare(&[input], &out, TokenizerSpec::TrainBpe(320), 0.1).unwrap();
    out
}
