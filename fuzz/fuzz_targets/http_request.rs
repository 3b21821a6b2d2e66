#![no_main]
//! `cargo fuzz run http_request` (see fuzz/README.md).

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::report_panics_without_aborting();
    harness::http_request(data)
});
