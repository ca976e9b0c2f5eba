//! `kiln ablate` end to end: a base, one training variant and one export-only variant, two
//! seeds each, on tiny-golf; the table (Markdown and JSON) holds every configuration with its
//! seeds, both byte counts for a SentencePiece vocabulary, the loss curves are drawn, the
//! export-only variant scores the base's own runs without training, and a rerun after one
//! result is removed trains that run alone. A plan that sets what the sweep sets itself is
//! refused.

mod common;

use std::fs;

use common::kiln;

#[test]
fn a_sweep_tabulates_every_seed_and_resumes() {
    let dir = common::temp_dir("ablate", "sweep");
    // A corpus with a SentencePiece vocabulary (llama2.c's format), so the challenge's byte
    // count applies too: never fewer bytes than the true count, so never more bits per byte.
    let text = dir.join("text");
    fs::create_dir_all(&text).unwrap();
    let line = "the hat ate a tea at the heath  then the ant ran in the rain\n";
    fs::write(text.join("a.txt"), line.repeat(120)).unwrap();
    let tokenizer = dir.join("tokenizer.bin");
    fs::write(&tokenizer, common::small_tokenizer_bin()).unwrap();
    let data = dir.join("data");
    let spec = tokenizer.display().to_string().parse().unwrap();
    kiln_formats::data::prepare(&[text], &data, spec, 0.1).unwrap();
    let plan = serde_json::json!({
        "data": data,
        "base": ["--model", "tiny-golf", "--steps", "4", "--batch", "2", "--seq", "16"],
        "variants": [
            {"name": "fast", "flags": ["--lr", "0.01", "--seq", "8"]},
            {"name": "clip", "export": {"clip_search": true}},
            {"name": "cache", "eval": {"ngram_cache": {"order": 3, "weight": 0.3}}}
        ],
        "seeds": 2,
        "scheme": "ternary"
    });
    let plan_path = dir.join("plan.json");
    fs::write(&plan_path, plan.to_string()).unwrap();
    let out = dir.join("sweep");
    let args = [
        "--backend",
        "reference",
        "ablate",
        "--plan",
        plan_path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let (ok, stdout, err) = kiln(&args, &[]);
    assert!(ok, "{stdout}\n{err}");
    assert!(
        stdout.contains(
            "4 configurations × 2 seeds: 8 of 8 runs to do (4 of them export or scoring only, \
             on the base's trained runs)"
        ),
        "{stdout}"
    );
    // The export-only variant trained nothing: it exported the base's runs with the search.
    assert!(!out.join("runs/clip-seed1").exists());
    assert!(stdout.contains("(the base's run, exported with clip search, scored plainly)"));
    assert!(!out.join("runs/cache-seed1").exists());

    let table: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("ablation.json")).unwrap()).unwrap();
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    for (row, name) in rows.iter().zip(["base", "fast", "clip", "cache"]) {
        assert_eq!(row["variant"], name);
        assert_eq!(row["seeds"], 2);
        let bpb = row["roundtrip_bpb_mean"].as_f64().unwrap();
        assert!(bpb > 0.0 && bpb.is_finite(), "{row}");
        assert!(row["artifact_bytes_mean"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["steps_mean"], 4.0);
        let challenge = row["roundtrip_bpb_challenge_mean"].as_f64().unwrap();
        assert!(challenge > 0.0 && challenge <= bpb + 1e-12, "{row}");
    }
    assert_eq!(rows[0]["delta"], 0.0);
    assert_eq!(
        (rows[1]["paired"].as_bool(), rows[2]["paired"].as_bool()),
        (Some(false), Some(true))
    );
    // The same trained weights: the export-only variant's bits per byte before export are
    // the base's, exactly.
    assert_eq!(rows[2]["val_bpb_mean"], rows[0]["val_bpb_mean"]);
    let md = fs::read_to_string(out.join("ablation.md")).unwrap();
    assert!(md.contains("| fast | `--lr 0.01 --seq 8` | 2 |"), "{md}");
    // The variant's --seq overrode the base's: half the tokens per step.
    assert_eq!(rows[1]["tokens_mean"], 4.0 * 2.0 * 8.0);
    assert_eq!(rows[0]["tokens_mean"], 4.0 * 2.0 * 16.0);
    assert!(
        md.contains("| clip | export: clip search (the base's runs) | 2 |"),
        "{md}"
    );
    // The corpus repeats one line: the cache of the tokens already scored predicts the rest,
    // before export and after the round trip alike, on the same trained weights.
    assert_eq!(rows[3]["paired"], true);
    let cache_row = "| cache | scored with a 3-gram cache of weight 0.3 (the base's runs) | 2 |";
    assert!(md.contains(cache_row), "{md}");
    for key in ["roundtrip_bpb_mean", "val_bpb_mean"] {
        let (base, cache) = (
            rows[0][key].as_f64().unwrap(),
            rows[3][key].as_f64().unwrap(),
        );
        assert!(cache < base - 0.1, "{key}: {cache} against {base}");
    }
    assert!(out.join("curves/loss_vs_steps.png").exists());

    // One result removed: the rerun trains that run alone and keeps the others.
    let kept = fs::read_to_string(out.join("results/base-seed1.json")).unwrap();
    fs::remove_file(out.join("results/fast-seed2.json")).unwrap();
    let (ok, stdout, err) = kiln(&args, &[]);
    assert!(ok, "{stdout}\n{err}");
    assert!(stdout.contains("1 of 8 runs to do"), "{stdout}");
    assert!(stdout.contains("== fast, seed 2 (run 1 of 1)"), "{stdout}");
    assert_eq!(
        fs::read_to_string(out.join("results/base-seed1.json")).unwrap(),
        kept
    );
    assert!(out.join("results/fast-seed2.json").exists());

    // The sweep sets --seed, --data and --out itself.
    let bad = serde_json::json!({"data": data, "base": ["--seed", "3"], "variants": []});
    fs::write(&plan_path, bad.to_string()).unwrap();
    let (ok, _, err) = kiln(&args, &[]);
    assert!(
        !ok && err.contains("--seed is set by the sweep itself"),
        "{err}"
    );
    // A variant with neither flags nor an export of its own would repeat the base.
    let same = serde_json::json!({"data": data, "base": [], "variants": [{"name": "same"}]});
    fs::write(&plan_path, same.to_string()).unwrap();
    let (ok, _, err) = kiln(&args, &[]);
    assert!(
        !ok && err.contains("variant 'same' changes nothing"),
        "{err}"
    );
    fs::remove_dir_all(&dir).ok();
}
