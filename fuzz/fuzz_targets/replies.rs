//! Backend reply decoder (RESP2 and RESP3): any bytes, any split, three sets of limits.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| datamesh_fuzz::check_replies(data));
