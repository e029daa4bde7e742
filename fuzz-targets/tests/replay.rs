//! Every input of the checked-in fuzz corpora (`fuzz/corpus/TARGET/`), run through its target
//! as an ordinary test: what the fuzzers found (and the inputs that reach deep) stays fixed.
//! A target with no corpus directory fails: a corpus must not silently disappear.

use std::path::PathBuf;

#[test]
fn every_corpus_input_runs_clean() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (name, run) in micromsg_fuzz_targets::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("the corpus of {name} ({}) is missing: {e}", dir.display()))
            .map(|entry| entry.expect("a corpus entry").path())
            .filter(|p| p.is_file())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "the corpus of {name} is empty");
        for path in &inputs {
            let data = std::fs::read(path).expect("a corpus input");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(
                outcome.is_ok(),
                "{name}: input {} breaks an invariant",
                path.display()
            );
        }
        eprintln!("{name}: {} inputs replayed", inputs.len());
    }
}

#[test]
fn the_empty_input_and_short_inputs_run_clean() {
    for (_, run) in micromsg_fuzz_targets::TARGETS {
        run(&[]);
        for len in 1..64u8 {
            run(&(0..len).map(|i| i.wrapping_mul(37)).collect::<Vec<u8>>());
        }
    }
}
