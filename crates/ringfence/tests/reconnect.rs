//! virtio-msg reconnect: the backend is killed (SIGKILL) twice while
//! `ringfence writer` keeps 16 requests in flight and restarted each time;
//! the writer attaches again, resubmits what was unacknowledged, and in the
//! end every block holds its last acknowledged write, read back through the
//! backend and on the image itself.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{backend_daemon, Env, BIN};

/// Kills (SIGKILL) the backend on drop, as a failed assertion must not
/// leave it running.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The writer's pattern (`writer::block_pattern`, which the binary crate
/// does not export).
fn block_pattern(seed: u64, block: u64, gen: u32, buf: &mut [u8]) {
    let mut x = seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(gen) << 40;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    buf[..8].copy_from_slice(&block.to_le_bytes());
    buf[8..12].copy_from_slice(&gen.to_le_bytes());
}

fn field(json: &str, key: &str) -> String {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} in {json}"));
    json[at + key.len() + 3..]
        .split([',', '}'])
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn the_writer_attaches_again_and_resubmits_when_the_backend_is_killed_under_load() {
    let env = Env::new("reconnect");
    let image = env.image(16);
    let socket = env.socket();
    let (blocks, passes) = (1024u64, 120u32);
    let mut backend = Backend(backend_daemon(&socket, &image, &[]));
    let mut writer = Command::new(BIN)
        .args(["writer", "--socket-path"])
        .arg(&socket)
        .args([
            "--blocks",
            &blocks.to_string(),
            "--passes",
            &passes.to_string(),
        ])
        .args(["--queue-depth", "16", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The kills start once the writer is attached and writing.
    let mut stderr = std::io::BufReader::new(writer.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("writer: attached") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).unwrap();
        assert!(n > 0, "the writer ended before attaching");
    }
    // Drained on a thread, so that the writer never blocks on a full pipe.
    let drain = std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(400));
        drop(backend);
        // The dead backend's socket file stays: remove it, so that waiting
        // for the socket waits for the new backend.
        let _ = std::fs::remove_file(&socket);
        backend = Backend(backend_daemon(&socket, &image, &[]));
    }
    // A writer that lost a request would wait forever: bounded here.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while writer.try_wait().unwrap().is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = writer.kill();
            panic!("the writer hung after the backend restarts");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = writer.wait_with_output().unwrap();
    let _ = drain.join();
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("writer: {json}");
    assert!(out.status.success(), "writer failed: {json}");
    assert_eq!(field(&json, "verified"), "true", "{json}");
    assert_eq!(field(&json, "wrong_blocks"), "0", "{json}");
    let reconnects: u64 = field(&json, "reconnects").parse().unwrap();
    let resubmitted: u64 = field(&json, "resubmitted").parse().unwrap();
    assert!(
        reconnects >= 1,
        "the kills landed while the writer ran: {json}"
    );
    assert!(
        resubmitted >= 1,
        "requests were in flight at a kill: {json}"
    );
    // Every write was acknowledged exactly once, so the counts add up.
    let acknowledged: u64 = field(&json, "acknowledged").parse().unwrap();
    let flushes: u64 = field(&json, "flushes").parse().unwrap();
    assert_eq!(acknowledged - flushes, blocks * u64::from(passes), "{json}");
    drop(backend);
    // The image itself: the last pass in every block.
    let disk = std::fs::read(&image).unwrap();
    let mut want = vec![0u8; 4096];
    for block in 0..blocks {
        block_pattern(0x5eed, block, passes - 1, &mut want);
        let at = block as usize * 4096;
        assert!(
            disk[at..at + 4096] == want[..],
            "block {block} on the image"
        );
    }
}
