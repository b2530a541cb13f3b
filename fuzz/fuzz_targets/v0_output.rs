//! Bytes a `snakepit-v0` worker writes on its stdout (the readiness probe's answer first)
//! through a real v0 connection with calls and a ping in flight. See
//! `snakepit_transport_stdio::fuzzing::fuzz_v0_output`.
#![no_main]

#[path = "alloc.rs"]
mod alloc;

use snakepit_transport_stdio::fuzzing::{fuzz_v0_output, WORKER_OUTPUT_C, WORKER_OUTPUT_K};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_, peak) = alloc::peak_during(|| fuzz_v0_output(data));
    let bound = WORKER_OUTPUT_K * data.len() + WORKER_OUTPUT_C;
    assert!(peak <= bound, "{} input bytes made the host allocate {peak} bytes (bound {bound})", data.len());
});
