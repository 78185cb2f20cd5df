//! The proxy's session in process, on a real redis-server: one client connection per input
//! (see `src/session.rs`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| datamesh_fuzz::session::check_session(data));
