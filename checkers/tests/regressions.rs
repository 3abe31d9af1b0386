//! Replays the committed regression corpus, `fuzz/regressions/<target>/*`: every input that
//! ever failed a checker (or reached a case a checker once got wrong) must pass.

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8]) -> iopt_checkers::Outcome) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no regression inputs for {target}");
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if let Err(failure) = check(&data) {
            panic!("{}:\n{failure}", f.display());
        }
    }
    eprintln!("{target}: {} regression input(s) pass", files.len());
}

#[test]
fn differential() {
    replay("differential", iopt_checkers::differential::check_bytes);
}

#[test]
fn faults() {
    replay("faults", iopt_checkers::faults::check_bytes);
}

#[test]
fn config() {
    replay("config", iopt_checkers::config::check_bytes);
}

#[test]
fn descriptor() {
    replay("descriptor", iopt_checkers::descriptor::check_bytes);
}
