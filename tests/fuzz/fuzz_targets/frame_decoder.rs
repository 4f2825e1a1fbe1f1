//! Fuzz target `frame_decoder`. The oracle is `cmqd_fuzz::frame_decoder` in `tests/fuzz/src/lib.rs`,
//! which the stable suite replays too (`tests/it/fuzz_regressions.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| cmqd_fuzz::frame_decoder(data));
