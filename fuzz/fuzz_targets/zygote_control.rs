//! Control packets the zygote sends back to the host. See
//! `snakepit_supervisor::fuzzing::fuzz_zygote_packets`.
#![no_main]

#[path = "alloc.rs"]
mod alloc;

use snakepit_supervisor::fuzzing::{fuzz_zygote_packets, ZYGOTE_C, ZYGOTE_K};

#[global_allocator]
static ALLOC: alloc::Counting = alloc::Counting;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_, peak) = alloc::peak_during(|| fuzz_zygote_packets(data));
    let bound = ZYGOTE_K * data.len() + ZYGOTE_C;
    assert!(peak <= bound, "{} input bytes made the host allocate {peak} bytes (bound {bound})", data.len());
});
