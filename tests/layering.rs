//! The layering rules of issue 12, checked on the source: within kiln-core and within the
//! application crate, a module imports only modules below it in a declared order, so there are
//! no import cycles and no lower module reaches up (Cargo already refuses cycles between the
//! crates themselves). Test code (`#[cfg(test)]` modules) is not checked.

use std::path::{Path, PathBuf};

/// `crate::<name>` references in a file's non-test code.
fn imports(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let code: String = text
        .split("#[cfg(test)]")
        .next()
        .unwrap()
        .lines()
        .map(|line| line.split("//").next().unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        // `$crate::` is a macro's own path to the crate root, not an import.
        if code[..i].ends_with('$') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(stripped) = rest.strip_prefix('{') {
            let inner = &stripped[..stripped.find('}').unwrap()];
            for item in inner.split(',') {
                let name: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push(name);
            }
        } else {
            found.push(
                rest.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    found
}

/// The module a name at the crate root belongs to (`Error`, `Result`, the macros: `error`).
fn module_of(name: &str) -> &str {
    match name {
        "Error" | "Result" | "fail" | "require" => "error",
        "with_backend" => "backends",
        other => other,
    }
}

/// Every file of `dir` with the module it belongs to (a directory's files belong to it).
fn files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            for (_, file) in files(&path) {
                out.push((stem.clone(), file));
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((stem, path));
        }
    }
    out
}

fn check(dir: &Path, order: &[&str], roots: &[&str]) {
    let rank = |m: &str| order.iter().position(|o| *o == m);
    let mut violations = Vec::new();
    for (module, path) in files(dir) {
        if roots.contains(&module.as_str()) {
            continue;
        }
        let Some(mine) = rank(&module) else {
            violations.push(format!(
                "{}: module '{module}' is not in the declared order",
                path.display()
            ));
            continue;
        };
        for name in imports(&path) {
            let target = module_of(&name);
            if target == module {
                continue;
            }
            match rank(target) {
                Some(theirs) if theirs < mine => {}
                Some(_) => violations.push(format!(
                    "{}: '{module}' imports '{target}', which is not below it",
                    path.display()
                )),
                None => violations.push(format!(
                    "{}: '{module}' imports unknown module '{target}'",
                    path.display()
                )),
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn core_modules_import_only_modules_below_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/core/src");
    let order = [
        "backend", "bytes", "cpu", "error", "config", "layout", "quant", "vocab", "model", "optim",
        "sample", "eval",
    ];
    check(&dir, &order, &["lib"]);
}

#[test]
fn application_modules_import_only_modules_below_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    // The dashboard and reports read telemetry; they never reach the trainer.
    let order = [
        "interrupt",
        "distributed",
        "machine",
        "backends",
        "run_config",
        "telemetry",
        "runlog",
        "rundir",
        "calibrate",
        "bench",
        "commands",
        "train",
        "dashboard",
        "report",
        "ablate",
        "doctor",
    ];
    check(&dir, &order, &["lib", "main"]);
}

#[test]
fn the_checker_sees_a_violation() {
    // A module reaching up must be reported: the check is not vacuous.
    let dir = std::env::temp_dir().join(format!("kiln-layering-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("low.rs"), "use crate::high::Thing;\n").unwrap();
    std::fs::write(dir.join("high.rs"), "use crate::low::Other;\n").unwrap();
    let result = std::panic::catch_unwind(|| check(&dir, &["low", "high"], &[]));
    std::fs::remove_dir_all(&dir).unwrap();
    let message = *result.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("'low' imports 'high'"), "{message}");
}
