//! `ringfence writer`: a block workload on our own virtio-blk driver over
//! virtio-msg that survives the backend: when the backend dies (killed,
//! restarted, upgraded), the writer attaches again, resubmits every request
//! it had not seen acknowledged, in the order it first submitted them, and
//! carries on. Nothing acknowledged is lost or written twice over a newer
//! write: a block has at most one write in flight, and only unacknowledged
//! requests are submitted again (redoing one writes the same bytes).
//!
//! That holds when the old backend's I/O is over by the time the new
//! session writes: true of a backend process that died (the kernel ends
//! its requests with it), and of one that reset the device once its
//! workers stopped. A backend that lives on with writes stuck in its disk
//! is not covered.
//!
//! The workload writes `--blocks` 4 KiB blocks `--passes` times (each pass a
//! new generation of every block), `--queue-depth` requests in flight, a
//! FLUSH every 32 writes and at the end; then it reads every block back and
//! checks it holds its last acknowledged generation. `--json` prints one
//! line with the counts (reconnects, resubmitted, acknowledged).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_bus::DriverBus;
use ringfence_bus_local::{LocalBusConfig, LocalDriverBus};
use ringfence_msg_driver::{discover, BouncePool, CompletionWaiter, MsgTransport};
use ringfence_virtqueue::{BlkDriver, BlkRequest, VIRTIO_BLK_S_OK};

/// Options of `ringfence writer`.
#[derive(Debug, clap::Args)]
pub struct WriterArgs {
    /// Unix socket of the backend.
    #[arg(long)]
    pub socket_path: PathBuf,
    /// 4 KiB blocks written per pass, from the start of the disk.
    #[arg(long, default_value_t = 2048)]
    pub blocks: u64,
    /// Passes over the blocks; pass p writes generation p.
    #[arg(long, default_value_t = 4)]
    pub passes: u32,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    pub queue_depth: usize,
    /// How long to keep trying to attach again after the backend went
    /// away, in milliseconds (0: fail at once, as a driver without
    /// reconnect would).
    #[arg(long, default_value_t = 30_000)]
    pub reconnect_ms: u64,
    /// Seed of the data pattern.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Print the result as one JSON line.
    #[arg(long)]
    pub json: bool,
}

const BLOCK: usize = 4096;
const QUEUE_SIZE: u16 = 128;
/// How long a request may go unanswered before the session is given up.
const STALL: Duration = Duration::from_secs(10);
/// Flush after this many acknowledged writes.
const FLUSH_EVERY: u64 = 32;
/// Sessions in a row lost before any request was acknowledged: a backend
/// that fails every resubmission is given up on, not retried forever.
const MAX_FRUITLESS_SESSIONS: u32 = 3;

/// The bytes of `block` at generation `gen`: a header naming both, then a
/// pattern from them.
pub fn block_pattern(seed: u64, block: u64, gen: u32, buf: &mut [u8]) {
    let mut x = seed ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(gen) << 40;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(b.get(..chunk.len()).unwrap_or(&[]));
    }
    if let Some(h) = buf.get_mut(..12) {
        h[..8].copy_from_slice(&block.to_le_bytes());
        h[8..].copy_from_slice(&gen.to_le_bytes());
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write { block: u64, gen: u32 },
    Flush,
}

/// One attachment to the backend: the driver, its window and a data slot
/// per request in flight.
struct Session {
    driver: BlkDriver<MsgTransport>,
    waiter: CompletionWaiter,
    /// Device address and local pointer of each slot's 4 KiB buffer.
    slots: Vec<(u64, *mut u8)>,
    free: Vec<usize>,
    /// token -> (journal sequence, slot).
    in_flight: BTreeMap<u16, (u64, Option<usize>)>,
    _window: Arc<BouncePool>,
}

impl Session {
    fn attach(socket: &std::path::Path, depth: usize) -> Result<Self, Box<dyn std::error::Error>> {
        let bus: Arc<dyn DriverBus> =
            Arc::new(LocalDriverBus::connect(socket, LocalBusConfig::default())?);
        let dev = *discover(bus.as_ref())?
            .first()
            .ok_or("no device on the bus")?;
        let transport = MsgTransport::new(bus.clone(), dev)?;
        let waiter = transport.waiter();
        let region_len = BlkDriver::<MsgTransport>::region_size(QUEUE_SIZE);
        let window = Arc::new(BouncePool::new(bus.share_area(
            (region_len + depth * BLOCK).next_multiple_of(1 << 20) + (1 << 20),
        )?));
        // SAFETY: `window` is kept in the session, next to the driver.
        let driver = unsafe { crate::bench_blk::driver_in_window(transport, &window, QUEUE_SIZE) }?;
        let slots = (0..depth)
            .map(|_| window.alloc(BLOCK, BLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            driver,
            waiter,
            slots,
            free: (0..depth).rev().collect(),
            in_flight: BTreeMap::new(),
            _window: window,
        })
    }

    /// Submits `op` (journal entry `seq`); a write's bytes go into a free slot.
    fn submit(&mut self, seq: u64, op: Op, seed: u64) -> Result<(), Box<dyn std::error::Error>> {
        let (req, slot) = match op {
            Op::Flush => (BlkRequest::Flush, None),
            Op::Write { block, gen } => {
                let slot = self.free.pop().ok_or("no free slot")?;
                let &(addr, ptr) = self.slots.get(slot).ok_or("slot")?;
                // SAFETY: `ptr` is this slot's 4 KiB in the window, not in
                // flight (it was free), and only this thread writes it.
                let buf = unsafe { std::slice::from_raw_parts_mut(ptr, BLOCK) };
                block_pattern(seed, block, gen, buf);
                let req = BlkRequest::Write {
                    sector: block * (BLOCK as u64 / 512),
                    data: addr,
                    len: BLOCK as u32,
                };
                (req, Some(slot))
            }
        };
        let token = self.driver.submit(req)?;
        self.in_flight.insert(token, (seq, slot));
        Ok(())
    }

    fn room(&self) -> bool {
        !self.free.is_empty() && self.driver.free_descriptors() >= 3
    }
}

/// What a run did.
#[derive(Debug, Default)]
struct Outcome {
    acknowledged: u64,
    reconnects: u64,
    resubmitted: u64,
    flushes: u64,
}

pub fn run(args: WriterArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let depth = args.queue_depth.clamp(1, usize::from(QUEUE_SIZE) / 3);
    // The plan: every block, pass after pass; a FLUSH every FLUSH_EVERY writes.
    let mut plan = (0..args.passes)
        .flat_map(|gen| (0..args.blocks).map(move |block| Op::Write { block, gen }))
        .peekable();
    // Submitted and not acknowledged, by sequence: what a new session resubmits.
    let mut journal: BTreeMap<u64, Op> = BTreeMap::new();
    let mut busy_blocks = std::collections::HashSet::new();
    let mut acked_gen: Vec<Option<u32>> = vec![None; usize::try_from(args.blocks)?];
    let mut next_seq = 0u64;
    let mut writes_since_flush = 0u64;
    let mut final_flush_done = false;
    let mut out = Outcome::default();
    let mut session: Option<Session> = None;
    let mut fruitless = 0u32;
    let mut acked_at_attach = 0u64;
    // What the first session found: a backend that comes back as another
    // disk is not resubmitted to.
    let mut device: Option<(u64, bool)> = None;
    loop {
        let Some(s) = session.as_mut() else {
            let s = attach_again(&args, depth, out.reconnects > 0 || next_seq > 0)?;
            let found = (s.driver.capacity_sectors(), s.driver.read_only());
            if *device.get_or_insert(found) != found {
                return Err(format!(
                    "the backend came back with another disk: {found:?}, was {device:?}"
                )
                .into());
            }
            if found.1 {
                return Err("the disk is read-only".into());
            }
            acked_at_attach = out.acknowledged;
            let s = session.insert(s);
            // Resubmit, in first-submission order, what was never acknowledged.
            for (&seq, &op) in &journal {
                s.submit(seq, op, args.seed)?;
                out.resubmitted += 1;
            }
            if !journal.is_empty() {
                tracing::info!(count = journal.len(), "resubmitted after attaching again");
            }
            s.driver.kick();
            continue;
        };
        // Fill up to the depth with the plan (one write per block in flight).
        while s.room() {
            let op = if writes_since_flush >= FLUSH_EVERY {
                writes_since_flush = 0;
                Op::Flush
            } else {
                match plan.peek() {
                    Some(&Op::Write { block, .. }) if busy_blocks.contains(&block) => break,
                    Some(&op) => {
                        plan.next();
                        op
                    }
                    None if !final_flush_done && journal.is_empty() => {
                        final_flush_done = true;
                        Op::Flush
                    }
                    None => break,
                }
            };
            if let Op::Write { block, .. } = op {
                busy_blocks.insert(block);
            }
            journal.insert(next_seq, op);
            s.submit(next_seq, op, args.seed)?;
            next_seq += 1;
        }
        s.driver.kick();
        if journal.is_empty() && plan.peek().is_none() && final_flush_done {
            break;
        }
        // Wait for completions; a dead backend shows as an error here.
        let lost = match wait_completions(s) {
            Ok(true) => false,
            Ok(false) => {
                if !s.in_flight.is_empty() {
                    return Err(format!("no completion within {STALL:?}").into());
                }
                if !journal.is_empty() {
                    return Err("unacknowledged requests that are not in flight".into());
                }
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "backend lost");
                true
            }
        };
        if lost {
            session = None;
            out.reconnects += 1;
            fruitless = if out.acknowledged == acked_at_attach {
                fruitless + 1
            } else {
                0
            };
            if fruitless >= MAX_FRUITLESS_SESSIONS {
                return Err(format!(
                    "{fruitless} sessions in a row lost before any request completed"
                )
                .into());
            }
            continue;
        }
        while let Some(c) = s.driver.pop()? {
            let Some((seq, slot)) = s.in_flight.remove(&c.token) else {
                return Err(format!("completion for token {} not in flight", c.token).into());
            };
            if let Some(slot) = slot {
                s.free.push(slot);
            }
            let op = journal
                .remove(&seq)
                .ok_or("completion of a request not in the journal")?;
            if c.status != VIRTIO_BLK_S_OK {
                return Err(format!("request {op:?} failed with status {}", c.status).into());
            }
            out.acknowledged += 1;
            match op {
                Op::Write { block, gen } => {
                    busy_blocks.remove(&block);
                    if let Some(g) = acked_gen.get_mut(usize::try_from(block)?) {
                        *g = Some(gen);
                    }
                    writes_since_flush += 1;
                }
                Op::Flush => out.flushes += 1,
            }
        }
    }
    let s = session.as_mut().ok_or("no session")?;
    let wrong = verify(s, &acked_gen, args.seed)?;
    let ok = wrong == 0;
    if args.json {
        println!(
            "{{\"acknowledged\":{},\"flushes\":{},\"reconnects\":{},\"resubmitted\":{},\"blocks\":{},\"passes\":{},\"wrong_blocks\":{wrong},\"verified\":{ok}}}",
            out.acknowledged, out.flushes, out.reconnects, out.resubmitted, args.blocks, args.passes
        );
    } else {
        println!(
            "writer: {} requests acknowledged ({} flushes), {} reconnects, {} resubmitted; read back {} blocks: {}",
            out.acknowledged,
            out.flushes,
            out.reconnects,
            out.resubmitted,
            args.blocks,
            if ok { "all hold their last acknowledged write".to_string() } else { format!("{wrong} wrong") }
        );
    }
    Ok(ok)
}

/// Attaches, retrying while the backend is away (up to `--reconnect-ms`
/// when this is a re-attachment).
fn attach_again(
    args: &WriterArgs,
    depth: usize,
    again: bool,
) -> Result<Session, Box<dyn std::error::Error>> {
    let deadline =
        Instant::now() + Duration::from_millis(if again { args.reconnect_ms } else { 0 });
    loop {
        match Session::attach(&args.socket_path, depth) {
            Ok(s) => {
                if again {
                    tracing::info!("attached again");
                } else {
                    // Tests wait for this line before they disturb the backend.
                    eprintln!("writer: attached");
                }
                return Ok(s);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "backend not back yet");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Waits for used buffers: `Ok(false)` after STALL without any, `Err` once
/// the transport says the backend is gone.
fn wait_completions(s: &mut Session) -> Result<bool, Box<dyn std::error::Error>> {
    let deadline = Instant::now() + STALL;
    loop {
        if s.driver.has_used() {
            return Ok(true);
        }
        if s.driver.arm() {
            s.driver.disarm();
            return Ok(true);
        }
        let woken = s.waiter.wait(0, Duration::from_millis(100))?;
        if let Some(f) = s.waiter.failure() {
            return Err(f.into());
        }
        if woken || s.driver.has_used() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}

/// Reads every block back; returns how many do not hold their last
/// acknowledged generation.
fn verify(
    s: &mut Session,
    acked_gen: &[Option<u32>],
    seed: u64,
) -> Result<u64, Box<dyn std::error::Error>> {
    let mut wrong = 0u64;
    let mut want = vec![0u8; BLOCK];
    for (block, gen) in acked_gen.iter().enumerate() {
        let Some(gen) = *gen else { continue };
        let slot = s.free.pop().ok_or("no free slot")?;
        let &(addr, ptr) = s.slots.get(slot).ok_or("slot")?;
        let token = s.driver.submit(BlkRequest::Read {
            sector: block as u64 * (BLOCK as u64 / 512),
            data: addr,
            len: BLOCK as u32,
        })?;
        s.driver.kick();
        let c = loop {
            if let Some(c) = s.driver.pop()? {
                break c;
            }
            if !wait_completions(s)? {
                return Err("read-back stalled".into());
            }
        };
        s.free.push(slot);
        if c.token != token || c.status != VIRTIO_BLK_S_OK {
            return Err(format!("read-back of block {block} failed (status {})", c.status).into());
        }
        block_pattern(seed, block as u64, gen, &mut want);
        // SAFETY: the slot's 4 KiB in the window; the device is done with it.
        let got = unsafe { std::slice::from_raw_parts(ptr, BLOCK) };
        if got != want.as_slice() {
            wrong += 1;
        }
    }
    Ok(wrong)
}
