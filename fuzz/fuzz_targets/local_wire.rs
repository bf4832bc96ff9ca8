//! The local bus's own messages: classify never panics on any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringfence_bus_local::wire::classify(data);
});
