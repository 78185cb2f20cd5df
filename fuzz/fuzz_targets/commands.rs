//! Client command decoder: any bytes, any split, three sets of limits (see `src/lib.rs`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| datamesh_fuzz::check_commands(data));
