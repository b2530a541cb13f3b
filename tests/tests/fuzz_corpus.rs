//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) and the minimised crashes
//! (`fuzz/regressions/<target>/`) through the fuzz targets' entry points: deterministic, no
//! instrumentation, no cargo-fuzz. Each input must not panic, must end with a value or a typed
//! error, and must keep the host's peak heap (counted per thread by the same allocator the fuzz
//! targets use) within the entry point's stated bound `k * N + C`.

#[path = "../../fuzz/fuzz_targets/alloc.rs"]
mod alloc;

use std::path::{Path, PathBuf};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

/// Every file of the target's corpus and regressions, sorted (a missing directory is empty).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for e in entries {
            let path = e.expect("directory entry").path();
            if path.is_file() && path.file_name().is_some_and(|n| !n.to_string_lossy().starts_with('.')) {
                let bytes = std::fs::read(&path).expect("corpus file");
                files.push((path, bytes));
            }
        }
    }
    files.sort();
    files
}

/// Runs `run` on every input of `target`, checking the allocation bound; returns how many.
fn replay<T>(target: &str, k: usize, c: usize, run: impl Fn(&[u8]) -> T) -> usize {
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target}");
    for (path, bytes) in &files {
        let (_, peak) = alloc::peak_during(|| run(bytes));
        let bound = k * bytes.len() + c;
        assert!(
            peak <= bound,
            "{}: {} input bytes made the host allocate {peak} bytes (bound {bound})",
            path.display(),
            bytes.len()
        );
    }
    files.len()
}

#[test]
fn worker_output_corpus_replays() {
    use snakepit_transport_stdio::fuzzing::{fuzz_worker_output, WORKER_OUTPUT_C, WORKER_OUTPUT_K};
    let n = replay("worker_output", WORKER_OUTPUT_K, WORKER_OUTPUT_C, fuzz_worker_output);
    // The handshake-only seeds must succeed, so the corpus does reach the dispatch.
    let ready = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/worker_output/ready_then_answers"),
    )
    .expect("seed");
    assert_eq!(
        fuzz_worker_output(&ready).expect("handshake"),
        4,
        "a call, a ping and two chunks (call 2 fails)"
    );
    // Through the shared-memory arena: a result and a chunk copied out of it.
    let shm =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/worker_output/shm_ok"))
            .expect("seed");
    assert_eq!(fuzz_worker_output(&shm).expect("handshake"), 2, "call 1 and one chunk of the stream");
    assert!(n >= 36);
}

#[test]
fn serve_lines_corpus_replays() {
    use snakepit_cli::fuzzing::{fuzz_serve_input, SERVE_C, SERVE_K};
    let n = replay("serve_lines", SERVE_K, SERVE_C, fuzz_serve_input);
    assert_eq!(fuzz_serve_input(b"{\"id\":1,\"command\":\"x\"}\n{\"id\":2}\n"), (1, 1));
    assert!(n >= 30);
}

#[test]
fn zygote_control_corpus_replays() {
    use snakepit_supervisor::fuzzing::{fuzz_zygote_packets, ZYGOTE_C, ZYGOTE_K};
    let n = replay("zygote_control", ZYGOTE_K, ZYGOTE_C, fuzz_zygote_packets);
    assert_eq!(fuzz_zygote_packets(b"\x00\x02{}").map_err(|e| e.is_data()).err(), Some(true), "typed error");
    assert!(n >= 20);
}

#[test]
fn v0_output_corpus_replays() {
    use snakepit_transport_stdio::fuzzing::{fuzz_v0_output, WORKER_OUTPUT_C, WORKER_OUTPUT_K};
    replay("v0_output", WORKER_OUTPUT_K, WORKER_OUTPUT_C, fuzz_v0_output);
    // The well-formed seed gets through the probe and answers both calls and the ping.
    let good = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/v0_output/probe_then_answers"),
    )
    .expect("seed");
    assert_eq!(fuzz_v0_output(&good).expect("probe"), 2, "call 1 and the ping (call 2 failed in the worker)");
}
