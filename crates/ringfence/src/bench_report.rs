//! The report of `ringfence bench`: per-round samples reduced to medians and
//! medians of per-round ratios, written as markdown, JSON and SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use crate::bench_blk::{CellResult, Mode, ModelKind, MAX_QD};

/// Direction of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dir {
    /// Device writes, frontend reads.
    Read,
    /// Frontend writes.
    Write,
}

impl Dir {
    /// Write if `write`.
    pub fn of(write: bool) -> Self {
        if write {
            Dir::Write
        } else {
            Dir::Read
        }
    }
    fn name(self) -> &'static str {
        match self {
            Dir::Read => "read",
            Dir::Write => "write",
        }
    }
}

/// One cell of the suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    /// Wake-up mode.
    pub mode: Mode,
    /// Direction.
    pub dir: Dir,
    /// Queue depth.
    pub qd: usize,
    /// Request size in bytes.
    pub size: usize,
    /// Memory model.
    pub model: ModelKind,
}

/// One cell measured in one round.
pub struct Sample {
    /// The round.
    pub round: usize,
    /// The cell.
    pub cell: Cell,
    /// What it measured.
    pub result: CellResult,
}

/// What is kept of a sample.
#[derive(Debug, Clone, Copy)]
struct Figures {
    iops: f64,
    mib_s: f64,
    p50: f64,
    p99: f64,
    fe_cpu: f64,
    be_cpu: f64,
    requests: u64,
    errors: u64,
    stalls: u64,
}

/// "512 B", "4 KiB", "1 MiB".
pub fn size_label(size: usize) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else if size >= 1024 && size.is_multiple_of(1024) {
        format!("{} KiB", size >> 10)
    } else {
        format!("{size} B")
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median with its spread (min, max).
#[derive(Debug, Clone, Copy)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(v: Vec<f64>) -> Self {
        let finite: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
        Self {
            median: median(finite.clone()),
            min: finite.iter().copied().fold(f64::INFINITY, f64::min),
            max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
    fn show(&self) -> String {
        if !self.median.is_finite() {
            return "—".into();
        }
        if (self.max - self.min).abs() < 0.005 {
            format!("{:.2}", self.median)
        } else {
            format!("{:.2} ({:.2}–{:.2})", self.median, self.min, self.max)
        }
    }
}

/// Everything measured in one run.
pub struct Report {
    summary: String,
    samples: Vec<(usize, Cell, Figures)>,
    /// 4 KiB QD1 read latencies per model and mode, all rounds.
    latencies: BTreeMap<(Mode, ModelKind), Vec<u64>>,
    floor_rt: BTreeMap<(usize, Cell), f64>,
    floor_io: BTreeMap<(usize, Cell), f64>,
    floor_copy: BTreeMap<(usize, usize, Dir), f64>,
    crossovers: BTreeMap<(usize, Mode), Option<usize>>,
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores ({cpu}), Linux {kernel}")
}

impl Report {
    /// An empty report of a run described by `summary`.
    pub fn new(summary: &str) -> Self {
        Self {
            summary: summary.to_string(),
            samples: Vec::new(),
            latencies: BTreeMap::new(),
            floor_rt: BTreeMap::new(),
            floor_io: BTreeMap::new(),
            floor_copy: BTreeMap::new(),
            crossovers: BTreeMap::new(),
        }
    }

    /// Records one sample.
    pub fn add(&mut self, s: Sample) {
        let r = &s.result;
        let (fe_cpu, be_cpu) = r.cpu_us_per_request();
        let ok = r.requests > 0;
        let f = Figures {
            iops: r.iops(),
            mib_s: r.mib_s(),
            p50: if ok { r.percentile_us(0.5) } else { f64::NAN },
            p99: if ok { r.percentile_us(0.99) } else { f64::NAN },
            fe_cpu,
            be_cpu,
            requests: r.requests,
            errors: r.errors,
            stalls: r.stalls,
        };
        let c = s.cell;
        if c.size == 4096 && c.qd == 1 && c.dir == Dir::Read {
            self.latencies
                .entry((c.mode, c.model))
                .or_default()
                .extend_from_slice(&r.latencies_ns);
        }
        self.samples.push((s.round, c, f));
    }

    /// Records the round-trip part of a QD1 cell's floor in a round.
    pub fn floor_rt(&mut self, round: usize, cell: Cell, us: f64) {
        self.floor_rt.insert((round, cell), us);
    }

    /// Records the pread/pwrite part of a QD1 cell's floor in a round.
    pub fn floor_io(&mut self, round: usize, cell: Cell, us: f64) {
        self.floor_io.insert((round, cell), us);
    }

    /// Records the bounce copy floor of a round.
    pub fn floor_copy(&mut self, round: usize, size: usize, dir: Dir, us: f64) {
        self.floor_copy.insert((round, size, dir), us);
    }

    /// Records the adaptive model's calibrated crossover of a round.
    pub fn crossover(&mut self, round: usize, mode: Mode, bytes: Option<usize>) {
        self.crossovers.insert((round, mode), bytes);
    }

    fn get(&self, round: usize, cell: Cell) -> Option<Figures> {
        self.samples
            .iter()
            .find(|(r, c, _)| *r == round && *c == cell)
            .map(|(_, _, f)| *f)
    }

    fn rounds(&self) -> Vec<usize> {
        let mut r: Vec<usize> = self.samples.iter().map(|(r, ..)| *r).collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    fn cells(&self) -> Vec<Cell> {
        let mut c: Vec<Cell> = self.samples.iter().map(|(_, c, _)| *c).collect();
        c.sort();
        c.dedup();
        c
    }

    fn sizes(&self) -> Vec<usize> {
        let mut s: Vec<usize> = self.samples.iter().map(|(_, c, _)| c.size).collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    fn models(&self) -> Vec<ModelKind> {
        let mut m: Vec<ModelKind> = self.samples.iter().map(|(_, c, _)| c.model).collect();
        m.sort();
        m.dedup();
        m
    }

    /// Median over rounds of one figure of a cell.
    fn med(&self, cell: Cell, f: impl Fn(&Figures) -> f64) -> f64 {
        median(
            self.rounds()
                .into_iter()
                .filter_map(|r| self.get(r, cell).map(|x| f(&x)))
                .collect(),
        )
    }

    /// Median over rounds of (figure of `cell`) / (figure of `base`), each
    /// pair measured in the same round.
    fn ratio(&self, cell: Cell, base: Cell, f: impl Fn(&Figures) -> f64) -> Spread {
        Spread::of(
            self.rounds()
                .into_iter()
                .filter_map(|r| Some(f(&self.get(r, cell)?) / f(&self.get(r, base)?)))
                .collect(),
        )
    }

    /// The floor of a QD1 cell in one round: round trip + file I/O + the
    /// copies its model makes at that size.
    fn floor(&self, round: usize, cell: Cell) -> Option<f64> {
        let rt = self.floor_rt.get(&(round, cell))?;
        let io = self.floor_io.get(&(round, cell))?;
        let copy = self
            .floor_copy
            .get(&(round, cell.size, cell.dir))
            .copied()
            .unwrap_or(0.0);
        let copies = match cell.model {
            // The broker copies once, as the bounce path does.
            ModelKind::Bounce | ModelKind::HvCopy => copy,
            ModelKind::Adaptive => {
                let x = self.crossovers.get(&(round, cell.mode)).copied().flatten();
                if x.is_some_and(|x| cell.size >= x) {
                    0.0
                } else {
                    copy
                }
            }
            _ => 0.0,
        };
        Some(rt + io + copies)
    }

    fn floor_ratio(&self, cell: Cell) -> Spread {
        Spread::of(
            self.rounds()
                .into_iter()
                .filter_map(|r| Some(self.get(r, cell)?.p50 / self.floor(r, cell)?))
                .collect(),
        )
    }

    fn total_failures(&self) -> (u64, u64) {
        self.samples
            .iter()
            .fold((0, 0), |(e, s), (_, _, f)| (e + f.errors, s + f.stalls))
    }

    /// The crossover seen in the data: the smallest size from which `model`
    /// beats bouncing at every larger size, by `better` of the two cells.
    fn data_crossover(
        &self,
        model: ModelKind,
        mode: Mode,
        dir: Dir,
        qd: usize,
        better: impl Fn(f64, f64) -> bool,
        figure: impl Fn(&Figures) -> f64 + Copy,
    ) -> Option<usize> {
        let sizes = self.sizes();
        let wins: Vec<bool> = sizes
            .iter()
            .map(|&size| {
                let cell = |model| Cell {
                    mode,
                    dir,
                    qd,
                    size,
                    model,
                };
                better(
                    self.med(cell(model), figure),
                    self.med(cell(ModelKind::Bounce), figure),
                )
            })
            .collect();
        (0..sizes.len())
            .find(|&i| wins.get(i..).is_some_and(|w| w.iter().all(|&x| x)))
            .and_then(|i| sizes.get(i).copied())
    }

    fn crossover_text(&self) -> Vec<String> {
        let mut out = Vec::new();
        let modes: Vec<Mode> = {
            let mut m: Vec<Mode> = self.samples.iter().map(|(_, c, _)| c.mode).collect();
            m.sort();
            m.dedup();
            m
        };
        let show = |x: Option<usize>| {
            x.map_or("never (bounce wins at every size)".into(), |s| {
                format!("from {}", size_label(s))
            })
        };
        let models = self.models();
        for &mode in &modes {
            for model in [ModelKind::Grant, ModelKind::HvCopy] {
                if !models.contains(&model) {
                    continue;
                }
                for dir in [Dir::Read, Dir::Write] {
                    let lat = self.data_crossover(model, mode, dir, 1, |g, b| g < b, |f| f.p50);
                    let tput =
                        self.data_crossover(model, mode, dir, MAX_QD, |g, b| g > b, |f| f.mib_s);
                    out.push(format!(
                        "- {} {}: {model} beats bounce on QD1 latency {}; on QD{MAX_QD} throughput {}",
                        mode.name(),
                        dir.name(),
                        show(lat),
                        show(tput)
                    ));
                }
            }
            let calibrated: Vec<String> = self
                .crossovers
                .iter()
                .filter(|((_, m), _)| *m == mode)
                .map(|(_, x)| x.map_or("never".into(), size_label))
                .collect();
            out.push(format!(
                "- {} adaptive crossover calibrated per round (QD1 read): {}",
                mode.name(),
                calibrated.join(", ")
            ));
        }
        out
    }

    fn targets(&self) -> Vec<(String, Option<bool>, String)> {
        let c = |mode, dir, qd, size, model| Cell {
            mode,
            dir,
            qd,
            size,
            model,
        };
        let mut t = Vec::new();
        let b4 = c(Mode::Notify, Dir::Read, 1, 4096, ModelKind::Bounce);
        let f4 = c(Mode::Notify, Dir::Read, 1, 4096, ModelKind::FullShare);
        let r = self.ratio(b4, f4, |f| f.p50);
        t.push((
            "4 KiB QD1 read p50, bounce, notify ≤ 1.15 × full share".into(),
            r.median.is_finite().then_some(r.median <= 1.15),
            r.show(),
        ));
        // A path below its floor in every round says the floor is wrong, not
        // that the target is met.
        let against_floor = |r: Spread, goal: f64| {
            if r.max < 1.0 {
                (
                    None,
                    format!(
                        "{} — below the floor in every round: the floor is wrong",
                        r.show()
                    ),
                )
            } else {
                (r.median.is_finite().then_some(r.median <= goal), r.show())
            }
        };
        let (met, shown) = against_floor(self.floor_ratio(b4), 1.25);
        t.push((
            "4 KiB QD1 read p50, bounce, notify ≤ 1.25 × its floor".into(),
            met,
            shown,
        ));
        let poll4 = c(Mode::Poll, Dir::Read, 1, 4096, ModelKind::Bounce);
        let (met, shown) = against_floor(self.floor_ratio(poll4), 1.5);
        t.push((
            "polling: 4 KiB QD1 read p50, bounce ≤ 1.5 × its floor".into(),
            met,
            shown,
        ));
        let s128 = 128 << 10;
        let full = c(Mode::Notify, Dir::Read, MAX_QD, s128, ModelKind::FullShare);
        for (model, goal) in [(ModelKind::Bounce, 0.7), (ModelKind::InWindow, 0.95)] {
            let r = self.ratio(c(Mode::Notify, Dir::Read, MAX_QD, s128, model), full, |f| {
                f.mib_s
            });
            t.push((
                format!("128 KiB QD{MAX_QD} read, {model} ≥ {goal} × full share"),
                r.median.is_finite().then_some(r.median >= goal),
                r.show(),
            ));
        }
        let x = self.data_crossover(
            ModelKind::Grant,
            Mode::Notify,
            Dir::Read,
            1,
            |g, b| g < b,
            |f| f.p50,
        );
        t.push((
            "grants beat bounce above a crossover (notify, QD1 read)".into(),
            Some(x.is_some()),
            x.map_or("no crossover up to 1 MiB".into(), |s| {
                format!("from {}", size_label(s))
            }),
        ));
        // Where the hypervisor copy stands: no target, a placement.
        let placed: Vec<String> = [4096, 1 << 20]
            .into_iter()
            .filter(|s| self.sizes().contains(s))
            .map(|size| {
                let cell = |m| c(Mode::Notify, Dir::Read, 1, size, m);
                format!(
                    "{}: {} × bounce",
                    size_label(size),
                    self.ratio(cell(ModelKind::HvCopy), cell(ModelKind::Bounce), |f| f.p50)
                        .show()
                )
            })
            .collect();
        t.push((
            "hypervisor copy placed (notify, QD1 read p50; each request pays five round trips besides its own here: grant and revoke at the broker and over the bus, and the copy; see docs/memory-models.md)".into(),
            None,
            placed.join("; "),
        ));
        let mut worst = f64::NAN;
        let mut at = 0;
        for size in self.sizes() {
            let cell = |m| c(Mode::Notify, Dir::Read, 1, size, m);
            let a = self.med(cell(ModelKind::Adaptive), |f| f.p50);
            let best = self
                .med(cell(ModelKind::Bounce), |f| f.p50)
                .min(self.med(cell(ModelKind::Grant), |f| f.p50));
            let r = a / best;
            if r.is_finite() && (worst.is_nan() || r > worst) {
                worst = r;
                at = size;
            }
        }
        t.push((
            "adaptive within 5 % of the better of bounce and grant at every size (QD1 read p50)"
                .into(),
            worst.is_finite().then_some(worst <= 1.05),
            if worst.is_finite() {
                format!("worst {worst:.2} at {}", size_label(at))
            } else {
                "—".into()
            },
        ));
        let cpu = |f: &Figures| f.fe_cpu + f.be_cpu;
        let r = self.ratio(b4, f4, cpu);
        t.push((
            "CPU per 4 KiB request, bounce ≤ 1.3 × full share (both sides)".into(),
            r.median.is_finite().then_some(r.median <= 1.3),
            r.show(),
        ));
        t.push((
            "`ringfence vhost-user blk` ≥ 1.0 × qemu-storage-daemon (vhost-user peer bench)".into(),
            None,
            "measured by `ringfence bench vhost-user` (its own run; see README)".into(),
        ));
        t
    }

    /// A few lines for the terminal.
    pub fn headline(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "Memory models, virtio-blk ({})", machine());
        for l in self.crossover_text() {
            let _ = writeln!(s, "{l}");
        }
        for (what, met, value) in self.targets() {
            let mark = match met {
                Some(true) => "met   ",
                Some(false) => "MISSED",
                None => "  —   ",
            };
            let _ = writeln!(s, "  [{mark}] {what}: {value}");
        }
        let (errors, stalls) = self.total_failures();
        let _ = write!(s, "errors {errors}, stalls {stalls}");
        s
    }

    fn isolation_table(
        &self,
        title: &str,
        mode: Mode,
        qd: usize,
        figure: fn(&Figures) -> f64,
        out: &mut String,
    ) {
        let sizes = self.sizes();
        let _ = writeln!(out, "\n{title}\n");
        let _ = writeln!(
            out,
            "| model | {} |",
            sizes
                .iter()
                .map(|s| size_label(*s))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let _ = writeln!(out, "|---|{}", "---|".repeat(sizes.len()));
        for model in self.models() {
            let row: Vec<String> = sizes
                .iter()
                .map(|&size| {
                    let cell = |m| Cell {
                        mode,
                        dir: Dir::Read,
                        qd,
                        size,
                        model: m,
                    };
                    self.ratio(cell(model), cell(ModelKind::FullShare), figure)
                        .show()
                })
                .collect();
            let _ = writeln!(out, "| {model} | {} |", row.join(" | "));
        }
    }

    fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Ringfence memory models: virtio-blk, side by side\n");
        let _ = writeln!(s, "Machine: {}.  \nRun: {}.  \nEach figure is the median over rounds; a ratio is the median of per-round ratios (both cells measured in the same round), with its spread in brackets. This process was the frontend VM; each backend a separate process.\n", machine(), self.summary);
        let _ = writeln!(s, "## Crossovers\n");
        for l in self.crossover_text() {
            let _ = writeln!(s, "{l}");
        }
        let _ = writeln!(s, "\n## The cost of isolation (ratio to full share)");
        self.isolation_table(
            "QD1 read, p50 latency ÷ full share's (notify; lower is better):",
            Mode::Notify,
            1,
            |f| f.p50,
            &mut s,
        );
        self.isolation_table(
            &format!("QD{MAX_QD} read, throughput ÷ full share's (notify; higher is better):"),
            Mode::Notify,
            MAX_QD,
            |f| f.mib_s,
            &mut s,
        );
        self.isolation_table(
            "QD1 read, CPU per request of both sides together ÷ full share's (notify):",
            Mode::Notify,
            1,
            |f| f.fe_cpu + f.be_cpu,
            &mut s,
        );
        let _ = writeln!(s, "\n## Targets\n");
        let _ = writeln!(s, "| target | met | measured |\n|---|---|---|");
        for (what, met, value) in self.targets() {
            let m = match met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            };
            let _ = writeln!(s, "| {what} | {m} | {value} |");
        }
        let _ = writeln!(s, "\n## Floors (QD1), measured in the same rounds\n");
        let _ = writeln!(s, "Floor = GET_ID round trip through the same processes, queue and wake-up method (measured just before each QD1 cell) + page-cache pread/pwrite of the size on the image, into window memory + the model's copies on the path's own buffers. A path below its floor in every round would mean the floor is wrong, and the cell says so; below it in some rounds only is noise, and the cell says that.\n");
        let _ = writeln!(s, "| mode | dir | size | round trip µs | file I/O µs | bounce copies µs | bounce p50 ÷ floor | grant p50 ÷ floor | hv-copy p50 ÷ floor | in-window p50 ÷ floor | full share p50 ÷ floor |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
        let modes: Vec<Mode> = self
            .floor_rt
            .keys()
            .map(|(_, c)| c.mode)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for &mode in &modes {
            for dir in [Dir::Read, Dir::Write] {
                for size in self.sizes() {
                    let rt = median(
                        self.floor_rt
                            .iter()
                            .filter(|((_, c), _)| c.mode == mode && c.dir == dir && c.size == size)
                            .map(|(_, v)| *v)
                            .collect(),
                    );
                    let io = median(
                        self.floor_io
                            .iter()
                            .filter(|((_, c), _)| c.mode == mode && c.dir == dir && c.size == size)
                            .map(|(_, v)| *v)
                            .collect(),
                    );
                    let cp = median(
                        self.floor_copy
                            .iter()
                            .filter(|((_, sz, d), _)| *sz == size && *d == dir)
                            .map(|(_, v)| *v)
                            .collect(),
                    );
                    let fr = |model| {
                        let r = self.floor_ratio(Cell {
                            mode,
                            dir,
                            qd: 1,
                            size,
                            model,
                        });
                        if r.max < 1.0 {
                            format!(
                                "{} — below its floor in every round: the floor is wrong",
                                r.show()
                            )
                        } else if r.median < 1.0 {
                            format!("{} — at its floor (within the spread)", r.show())
                        } else {
                            r.show()
                        }
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {} | {rt:.1} | {io:.1} | {cp:.1} | {} | {} | {} | {} | {} |",
                        mode.name(),
                        dir.name(),
                        size_label(size),
                        fr(ModelKind::Bounce),
                        fr(ModelKind::Grant),
                        fr(ModelKind::HvCopy),
                        fr(ModelKind::InWindow),
                        fr(ModelKind::FullShare)
                    );
                }
            }
        }
        let _ = writeln!(s, "\n## Every cell (medians over rounds)\n");
        let _ = writeln!(s, "| mode | dir | QD | size | model | IOPS | MiB/s | p50 µs | p99 µs | CPU/req frontend µs | CPU/req backend µs | ratio to full share (IOPS) |");
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for cell in self.cells() {
            let full = Cell {
                model: ModelKind::FullShare,
                ..cell
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {} |",
                cell.mode.name(),
                cell.dir.name(),
                cell.qd,
                size_label(cell.size),
                cell.model,
                self.med(cell, |f| f.iops),
                self.med(cell, |f| f.mib_s),
                self.med(cell, |f| f.p50),
                self.med(cell, |f| f.p99),
                self.med(cell, |f| f.fe_cpu),
                self.med(cell, |f| f.be_cpu),
                self.ratio(cell, full, |f| f.iops).show()
            );
        }
        let (errors, stalls) = self.total_failures();
        let _ = writeln!(s, "\nErrors: {errors}. Stalls (a second with requests in flight and no completion): {stalls}.");
        let _ = writeln!(s, "\nPlots: [throughput](throughput.svg), [CPU per request](cpu.svg), [4 KiB QD1 latency](latency-4k-qd1.svg).");
        s
    }

    fn json(&self) -> String {
        let mut s = String::new();
        let _ = write!(
            s,
            "{{\"machine\":{:?},\"run\":{:?},\"samples\":[",
            machine(),
            self.summary
        );
        for (i, (round, c, f)) in self.samples.iter().enumerate() {
            let _ = write!(
                s,
                "{}{{\"round\":{round},\"mode\":\"{}\",\"dir\":\"{}\",\"qd\":{},\"size\":{},\"model\":\"{}\",\"requests\":{},\"iops\":{:.1},\"mib_s\":{:.2},\"p50_us\":{:.2},\"p99_us\":{:.2},\"cpu_frontend_us\":{:.3},\"cpu_backend_us\":{:.3},\"errors\":{},\"stalls\":{}}}",
                if i == 0 { "" } else { "," },
                c.mode.name(),
                c.dir.name(),
                c.qd,
                c.size,
                c.model,
                f.requests,
                f.iops,
                f.mib_s,
                nan0(f.p50),
                nan0(f.p99),
                f.fe_cpu,
                f.be_cpu,
                f.errors,
                f.stalls
            );
        }
        let _ = write!(s, "],\"floors\":[");
        let mut first = true;
        for ((round, c), rt) in &self.floor_rt {
            let _ = write!(
                s,
                "{}{{\"round\":{round},\"mode\":\"{}\",\"dir\":\"{}\",\"size\":{},\"model\":\"{}\",\"round_trip_us\":{rt:.2}}}",
                if first { "" } else { "," },
                c.mode.name(),
                c.dir.name(),
                c.size,
                c.model
            );
            first = false;
        }
        for ((round, c), v) in &self.floor_io {
            let _ = write!(
                s,
                ",{{\"round\":{round},\"mode\":\"{}\",\"dir\":\"{}\",\"size\":{},\"model\":\"{}\",\"file_io_us\":{:.2}}}",
                c.mode.name(),
                c.dir.name(),
                c.size,
                c.model,
                nan0(*v)
            );
        }
        for ((round, size, dir), v) in &self.floor_copy {
            let _ = write!(
                s,
                ",{{\"round\":{round},\"size\":{size},\"dir\":\"{}\",\"bounce_copy_us\":{:.2}}}",
                dir.name(),
                nan0(*v)
            );
        }
        let _ = write!(s, "],\"crossovers\":[");
        for (i, ((round, mode), x)) in self.crossovers.iter().enumerate() {
            let _ = write!(
                s,
                "{}{{\"round\":{round},\"mode\":\"{}\",\"bytes\":{}}}",
                if i == 0 { "" } else { "," },
                mode.name(),
                x.map_or("null".into(), |x| x.to_string())
            );
        }
        s.push_str("]}\n");
        s
    }

    /// Writes report.md, results.json and the plots into `dir`; true if no
    /// cell had an error or a stall.
    pub fn write(&self, dir: &Path) -> Result<bool, Box<dyn std::error::Error>> {
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("results.json"), self.json())?;
        self.plots(dir)?;
        let (errors, stalls) = self.total_failures();
        Ok(errors == 0 && stalls == 0)
    }

    fn plots(&self, dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
        let sizes = self.sizes();
        let models = self.models();
        let series =
            |qd: usize, figure: &dyn Fn(&Figures) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
                models
                    .iter()
                    .map(|&model| {
                        let pts = sizes
                            .iter()
                            .map(|&size| {
                                let cell = Cell {
                                    mode: Mode::Notify,
                                    dir: Dir::Read,
                                    qd,
                                    size,
                                    model,
                                };
                                ((size as f64).log2(), self.med(cell, figure))
                            })
                            .filter(|(_, y)| y.is_finite())
                            .collect();
                        (model.name().to_string(), pts)
                    })
                    .collect()
            };
        plot::lines(
            &dir.join("throughput.svg"),
            &format!("Read throughput vs request size, QD{MAX_QD}, notify"),
            "request size (log2 bytes)",
            "MiB/s",
            &series(MAX_QD, &|f| f.mib_s),
        )?;
        plot::lines(
            &dir.join("cpu.svg"),
            "CPU per request (frontend + backend) vs size, QD1 read, notify",
            "request size (log2 bytes)",
            "CPU µs per request",
            &series(1, &|f| f.fe_cpu + f.be_cpu),
        )?;
        let cdf: Vec<(String, Vec<(f64, f64)>)> = self
            .latencies
            .iter()
            .filter(|((mode, _), _)| *mode == Mode::Notify)
            .map(|((_, model), lat)| {
                let mut v = lat.clone();
                v.sort_unstable();
                let n = v.len().max(1);
                let step = (n / 200).max(1);
                let pts = v
                    .iter()
                    .enumerate()
                    .step_by(step)
                    .map(|(i, &ns)| (ns as f64 / 1e3, i as f64 / n as f64))
                    .collect();
                (model.name().to_string(), pts)
            })
            .collect();
        plot::lines(
            &dir.join("latency-4k-qd1.svg"),
            "4 KiB QD1 read latency distribution (CDF), notify",
            "latency µs",
            "fraction of requests",
            &cdf,
        )?;
        Ok(())
    }
}

fn nan0(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

mod plot {
    use std::path::Path;

    use plotters::prelude::*;

    /// One line per series, in an SVG file.
    pub fn lines(
        path: &Path,
        title: &str,
        x_label: &str,
        y_label: &str,
        series: &[(String, Vec<(f64, f64)>)],
    ) -> Result<(), Box<dyn std::error::Error>> {
        let pts = series.iter().flat_map(|(_, p)| p.iter());
        let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0f64);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
        if !x0.is_finite() || x1 <= x0 {
            x0 = 0.0;
            x1 = 1.0;
        }
        let y1 = if y1 > 0.0 { y1 * 1.08 } else { 1.0 };
        let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0f64..y1)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()?;
        for (i, (name, p)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    }
}
