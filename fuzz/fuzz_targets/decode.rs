//! Any bytes: decode never panics, and whatever decodes re-encodes to the same
//! message (ignoring bus padding past msg_size).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringfence_virtio_msg::decode;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode(data) {
        let mut buf = vec![0u8; 65536];
        if let Ok(n) = msg.encode(&mut buf) {
            assert_eq!(decode(&buf[..n]).ok(), Some(msg));
        }
    }
});
