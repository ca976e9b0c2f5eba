//! Helpers the integration tests share: a fresh temporary directory, a small corpus of
//! pseudo-random words prepared with a trained BPE, a small llama2.c tokenizer, and the kiln
//! binary run with arguments. (Each test binary uses some of them.)
#![allow(dead_code)]

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

/// A llama2.c `tokenizer.bin` of 300 pieces: the three specials, the 256 byte pieces, and
/// words and merges of a few letters (the space among them).
pub fn small_tokenizer_bin() -> Vec<u8> {
    let mut pieces: Vec<Vec<u8>> = ["<unk>", "<s>", "</s>"]
        .map(|s| s.as_bytes().to_vec())
        .into();
    pieces.extend((0..=255u8).map(|b| format!("<0x{b:02X}>").into_bytes()));
    for word in [
        " ", "e", "t", "h", "a", " t", "he", " the", "in", " a", "er", "an", "re",
    ] {
        pieces.push(word.as_bytes().to_vec());
    }
    let mut letters = b'a'..=b'z';
    while pieces.len() < 300 {
        let c = letters.next().unwrap_or(b'z');
        pieces.push(vec![b' ', c, c]);
    }
    llama2c_tokenizer(&pieces)
}

/// `pieces` as a llama2.c `tokenizer.bin`, scored by position.
pub fn llama2c_tokenizer(pieces: &[Vec<u8>]) -> Vec<u8> {
    let mut out = 16u32.to_le_bytes().to_vec();
    for (i, piece) in pieces.iter().enumerate() {
        out.extend((-(i as f32)).to_le_bytes());
        out.extend((piece.len() as u32).to_le_bytes());
        out.extend(piece);
    }
    out
}

/// Runs the kiln binary from the crate's root: (success, stdout, stderr).
pub fn kiln(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    command
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("KILN_BACKEND")
        .env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// The newest checkpoint of `run`, loaded whole (weights and optimizer state) on the
/// reference backend as a resume would; returns its step.
pub fn newest_loads(run: &Path) -> u64 {
    let (step, dir) = kiln_formats::checkpoint::list(&run.join("checkpoints"))
        .unwrap()
        .pop()
        .expect("a checkpoint");
    let manifest = kiln_formats::checkpoint::read_manifest(&dir).unwrap();
    let mut model =
        kiln_core::model::Model::new(kiln_reference::ReferenceBackend, manifest.model).unwrap();
    kiln_formats::checkpoint::load_into(&mut model, &dir, None, true)
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    step
}
