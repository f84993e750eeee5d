//! guest-perf: disk latency of the VMM under test with `iommu=on` vs
//! `iommu=off`, timed inside the L2 guest (agent scenario `perf`).
//!
//! Boots L2 `2 * --boots` times, alternating iommu=on and iommu=off (one
//! 256 MiB disk labelled `perf`), collects each boot's `AGENT-RESULT
//! scenario=perf` line and prints the per-boot values, then per metric the
//! mean over boots for on and off and the ratio on/off. A benchmark, not a
//! test: `cargo test` does not run it.
//!
//! ```text
//! VIRTIO_IOMMU_TEST_VMM=/path/to/vmm \
//!   cargo run --release -p guest-tests --bin guest-perf -- --boots 3 [key=value...]
//! ```
//!
//! `--paired` instead boots `--boots` times with two disks, `perf`
//! (iommu=on) and `perf-off` (iommu=off), and the agent alternates every
//! operation between them: both sides of the ratio then come from the
//! same boot, which takes out the bed's boot-to-boot variation (off-boot
//! 4 KiB reads range over 2x). It is not the issue's alternating-boots
//! method (the IOMMU thread also runs during the off side's operations).
//!
//! `--lazy` boots L2 with `iommu.strict=0` (unmaps batched through the
//! IOMMU's flush queue, Linux's x86 default) instead of `iommu.strict=1`.
//! `--busy N` keeps N threads spinning on this host, pinned to CPUs 0..N,
//! during every boot: a deterministic background load (e.g. `--busy 1` on
//! a 2-core host leaves the nested bed one free core).
//!
//! Each boot also measures the VMM's host CPU time per operation (all its
//! threads, from `/proc/<pid>/stat` in L1, read when the agent marks the
//! start and the end of each measured stretch; 10 ms ticks):
//! `read4k_cpu_us`, `read256k_cpu_us`, `write4k_cpu_us`, and with
//! throughput `qd32_cpu_us` (per read), `seq1m_cpu_us` (per 1 MiB read).
//! Not with `--paired` (the two disks' operations interleave); `--no-cpu`
//! leaves it out (no marks, no 50 ms pauses, the VMM's output unpiped).
//!
//! `--counters` (Cloud Hypervisor with the series' patch 25, nested route,
//! `VIRTIO_IOMMU_TEST_CH_REMOTE` naming its `ch-remote`) also reads the
//! virtio-iommu's counters at each mark and prints, per operation of each
//! stretch of the iommu=on boots: IOMMU requests, replies published inline
//! on the notifying vCPU, by the polling IOMMU thread and by that thread
//! outside polling, wake-ups of the thread, looks at the ring while
//! polling, and the polling time spent per polled reply. The agent then
//! pauses 400 ms at each mark (`mark_ms=400`) for L1's `ch-remote` call,
//! whose API request the VMM serves inside the measured stretch: a trace,
//! not a figure to publish beside runs without it.
//!
//! `--threads` (any VMM, nested route) reads each VMM thread's CPU ticks
//! at each mark as well and prints, per stretch, the CPU microseconds per
//! operation of each thread (threads of one name summed), iommu=on and
//! iommu=off: which thread the IOMMU's cost lands on. It also pauses
//! 400 ms at each mark.
//!
//! The last line, `PERF-SUMMARY ...`, repeats the summary's means and
//! ratios as `key=value` words for scripts.
//!
//! `--disk-opts K=V[,K=V]` appends options to every disk's `--disk` value
//! (e.g. `_disable_io_uring=on`, the reference VMM's worker threads).
//!
//! `key=value` words go to the agent (`n4k=1000 n256k=100 nw4k=500
//! warmup=16 seed=1 max_s=60`; throughput: `qd=32 qd_s=10 seq1m_s=10`,
//! with `--cpus 2` for QD32 as the performance issue asks). Environment knobs are those of the bed
//! (`VIRTIO_IOMMU_TEST_VMM`, `VIRTIO_IOMMU_TEST_ROUTE`, ...). Without images,
//! VMM or QEMU it prints `SKIP: guest-perf: <reason>` and exits 0.

use guest_tests::{report_timing, Bed, CliWords, DiskSpec, Outcome, Scenario};
use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: guest-perf [--boots N] [--cpus N] [--disk-mib N] [--timeout SECS] \
[--first on|off] [--paired] [--lazy] [--busy N] [--no-cpu] [--counters] [--threads] [--disk-opts K=V,..] [--quiet-wait SECS] [--quiet-cores X] [key=value...]   (key=value: agent params n4k n256k nw4k warmup seed max_s)";

/// Summary rows: agent fields, plus `l2init_ms` from the serial log.
const METRICS: &[&str] = &[
    "others_cores",
    "init_ms",
    "l2init_ms",
    "read4k_us",
    "read256k_us",
    "write4k_us",
    "read4k_med_us",
    "read256k_med_us",
    "write4k_med_us",
    "qd32_iops",
    "seq1m_mbps",
    "read4k_cpu_us",
    "read256k_cpu_us",
    "write4k_cpu_us",
    "qd32_cpu_us",
    "seq1m_cpu_us",
];

#[derive(Debug, PartialEq)]
struct Opts {
    boots: usize,
    cpus: u32,
    disk_mib: u64,
    timeout: Duration,
    first_on: bool,
    /// Before each boot, wait up to this long for other processes to use
    /// less than `quiet_cores` CPUs (0: do not wait).
    quiet_wait: Duration,
    quiet_cores: f64,
    /// One boot per round with both disks, operations alternating.
    paired: bool,
    /// Appended to every disk's `--disk` value.
    disk_opts: Option<String>,
    /// L2 in lazy mode (`iommu.strict=0`).
    lazy: bool,
    /// Host threads spinning during each boot.
    busy: usize,
    /// Measure the VMM's CPU time per operation.
    cpu: bool,
    /// Read the virtio-iommu's counters at the marks (Cloud Hypervisor).
    counters: bool,
    /// Read each VMM thread's CPU time at the marks.
    threads: bool,
    params: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        boots: 3,
        cpus: 1,
        disk_mib: 256,
        timeout: Duration::from_secs(300),
        first_on: true,
        quiet_wait: Duration::ZERO,
        quiet_cores: 0.3,
        paired: false,
        disk_opts: None,
        lazy: false,
        busy: 0,
        cpu: true,
        counters: false,
        threads: false,
        params: Vec::new(),
    };
    let mut w = CliWords::new(args);
    while let Some(a) = w.next_word() {
        match a {
            "--boots" => o.boots = w.number(a)?.max(1) as usize,
            "--cpus" => o.cpus = w.number(a)?.max(1) as u32,
            "--disk-mib" => o.disk_mib = w.number(a)?.max(16),
            "--timeout" => o.timeout = Duration::from_secs(w.number(a)?),
            "--first" => {
                o.first_on = match w.value(a)?.as_str() {
                    "on" => true,
                    "off" => false,
                    v => return Err(format!("--first: expected on or off, got {v:?}")),
                }
            }
            "--quiet-wait" => o.quiet_wait = Duration::from_secs(w.number(a)?),
            "--quiet-cores" => {
                let v = w.value(a)?;
                o.quiet_cores = v
                    .parse()
                    .map_err(|_| format!("--quiet-cores: not a number: {v:?}"))?
            }
            "--paired" => o.paired = true,
            "--disk-opts" => o.disk_opts = Some(w.value(a)?),
            "--lazy" => o.lazy = true,
            "--busy" => o.busy = w.number(a)? as usize,
            "--no-cpu" => o.cpu = false,
            "--counters" => o.counters = true,
            "--threads" => o.threads = true,
            "-h" | "--help" => return Err(String::new()),
            p if CliWords::is_agent_param(p) => o.params.push(p.to_string()),
            p => return Err(format!("unknown argument {p:?}")),
        }
    }
    Ok(o)
}

/// Host CPU accounting, to tell how much of the machine other processes
/// took while a boot ran (the nested bed's latencies depend on it).
#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    /// Busy CPU seconds of the whole host (/proc/stat).
    host_busy: f64,
    /// CPU seconds of this process and its waited-for children (QEMU / VMM).
    ours: f64,
}

impl CpuSample {
    fn take() -> Self {
        let tck = {
            // SAFETY: sysconf has no memory-safety preconditions.
            let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            if t > 0 {
                t as f64
            } else {
                100.0
            }
        };
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait irq softirq steal ...
        let f: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let busy: f64 = [0usize, 1, 2, 5, 6].iter().filter_map(|&i| f.get(i)).sum();
        let ru = |who| {
            // SAFETY: rusage is plain integers; all-zero is a valid value.
            let mut r: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: getrusage writes only into the struct we pass.
            unsafe { libc::getrusage(who, &mut r) };
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            tv(r.ru_utime) + tv(r.ru_stime)
        };
        Self {
            at: Instant::now(),
            host_busy: busy / tck,
            ours: ru(libc::RUSAGE_SELF) + ru(libc::RUSAGE_CHILDREN),
        }
    }

    /// CPUs used by other processes since `self` (e.g. 0.5 = half a core).
    fn others_cores_since(&self) -> f64 {
        let now = Self::take();
        let secs = now.at.duration_since(self.at).as_secs_f64().max(1e-3);
        ((now.host_busy - self.host_busy) - (now.ours - self.ours)).max(0.0) / secs
    }
}

/// Threads spinning on pinned CPUs until dropped (`--busy N`): the same
/// background load in every boot. Being this process's, their CPU time is
/// not counted in `others`.
struct BusyLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl BusyLoad {
    fn start(n: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|cpu| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET
                    // and sched_setaffinity only touch that local value.
                    unsafe {
                        let mut set: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(cpu, &mut set);
                        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
                    }
                    let mut x = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                })
            })
            .collect();
        BusyLoad { stop, threads }
    }
}

impl Drop for BusyLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Waits (up to `o.quiet_wait`) until other processes use less than
/// `o.quiet_cores` CPUs over a 3 s window.
fn wait_quiet(o: &Opts) {
    if o.quiet_wait.is_zero() {
        return;
    }
    let t = Instant::now();
    loop {
        let s = CpuSample::take();
        std::thread::sleep(Duration::from_secs(3));
        let busy = s.others_cores_since();
        if busy < o.quiet_cores {
            return;
        }
        if t.elapsed() >= o.quiet_wait {
            eprintln!(
                "guest-perf: host still busy ({busy:.2} CPUs used by others) after {:.0}s; booting anyway",
                t.elapsed().as_secs_f64()
            );
            return;
        }
    }
}

/// One boot's numbers.
struct BootResult {
    iommu: bool,
    wall: Duration,
    values: HashMap<String, f64>,
    line: String,
    log: String,
}

/// Uptime (ms) at which L2's /init started, from `L2-INIT start uptime=S`.
fn l2_init_ms(out: &Outcome) -> Option<f64> {
    out.lines_with("L2-INIT start ").first().and_then(|l| {
        guest_tests::parse_kv(l)
            .get("uptime")
            .and_then(|v| v.parse::<f64>().ok())
            .map(|s| s * 1000.0)
    })
}

/// One boot; with `o.paired`, both sides of one paired boot (iommu=on
/// first), otherwise one result for `iommu`.
fn one_boot(bed: &Bed, o: &Opts, iommu: bool) -> Result<Vec<BootResult>, String> {
    let mut s = Scenario::new("perf");
    s.disks = vec![DiskSpec::new("perf", o.disk_mib, iommu)];
    s.cpus = o.cpus;
    s.params = o.params.clone();
    if o.paired {
        s.disks = vec![
            DiskSpec::new("perf", o.disk_mib, true),
            DiskSpec::new("perf-off", o.disk_mib, false),
        ];
        s.params.push("pair=perf-off".into());
    }
    if let Some(opts) = &o.disk_opts {
        s.disks = s.disks.into_iter().map(|d| d.with_vmm_opts(opts)).collect();
    }
    s.timeout = o.timeout;
    s.strict = !o.lazy;
    if o.cpu && !o.paired {
        s.vmm_cpu_marks = true;
        s.params.push("cpu_marks=1".into());
        s.vmm_counters = o.counters;
        s.vmm_threads = o.threads;
        if o.counters || o.threads {
            s.params.push("mark_ms=400".into());
        }
    }
    let mut attempt = 0;
    let (out, wall, others) = loop {
        let t = Instant::now();
        let load = BusyLoad::start(o.busy);
        let cpu = CpuSample::take();
        let out = bed.run(&s);
        let others = cpu.others_cores_since();
        drop(load);
        let out = out?;
        // The run that counts (`Bed::run` may have retried an L1 oops).
        let wall = out.elapsed.min(t.elapsed());
        // L1 itself went away (QEMU exited without the VMM's exit line and
        // without a timeout): a failure of the bed, not of the VMM. Retry once.
        attempt += 1;
        if attempt < 2 && !out.timed_out && out.vmm_exit().is_none() {
            eprintln!(
                "RETRY: guest-perf: L1 stopped without L1-RESULT (bed failure); log {}",
                out.log_path.display()
            );
            continue;
        }
        break (out, wall, others);
    };
    report_timing(
        &format!("guest-perf iommu={}", if iommu { "on" } else { "off" }),
        &out,
    );
    let r = out.agent_result("perf").ok_or_else(|| {
        format!(
            "no AGENT-RESULT line for perf; last lines: {:?}; {}",
            out.lines.iter().rev().take(15).rev().collect::<Vec<_>>(),
            out.describe()
        )
    })?;
    if r.status != "pass" {
        return Err(format!("agent: {}; {}", r.line, out.describe()));
    }
    if out.l2_boots() != 1 {
        return Err(format!(
            "L2 booted {} times; {}",
            out.l2_boots(),
            out.describe()
        ));
    }
    let want = if iommu || o.paired { "on" } else { "off" };
    if r.fields.get("iommu").map(String::as_str) != Some(want) {
        return Err(format!("asked for iommu={want}, agent saw: {}", r.line));
    }
    if out.vmm_exit() != Some(0) {
        return Err(format!("VMM exit status; {}", out.describe()));
    }
    let mut values: HashMap<String, f64> = r
        .fields
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.parse::<f64>().ok()?)))
        .collect();
    if let Some(ms) = l2_init_ms(&out) {
        values.insert("l2init_ms".into(), ms);
    }
    values.insert("others_cores".into(), others);
    if o.cpu && !o.paired {
        let cpu = cpu_per_op(&out.vmm_cpu_marks());
        if cpu.is_empty() {
            return Err(format!(
                "no L1-CPU lines (does the agent print AGENT-MARK? --no-cpu goes without); {}",
                out.describe()
            ));
        }
        values.extend(cpu);
    }
    if o.threads {
        let threads = thread_cpu_per_op(&out.vmm_thread_marks());
        if threads.is_empty() {
            return Err(format!("no L1-THREADS lines; {}", out.describe()));
        }
        values.extend(threads);
    }
    if o.counters && iommu {
        let serving = serving_per_op(&out.vmm_counter_marks());
        if serving.is_empty() {
            return Err(format!(
                "no L1-COUNTERS lines with IOMMU counters (is the VMM the fork, with patch 25?); {}",
                out.describe()
            ));
        }
        values.extend(serving);
    }
    let log = out.log_path.display().to_string();
    if !o.paired {
        return Ok(vec![BootResult {
            iommu,
            wall,
            values,
            line: r.line,
            log,
        }]);
    }
    // The off side: the `off_` fields, and what both sides share.
    let mut off: HashMap<String, f64> = values
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("off_")?.to_string(), *v)))
        .collect();
    if !off.contains_key("read4k_us") {
        return Err(format!("paired boot without off_ fields: {}", r.line));
    }
    for k in ["init_ms", "l2init_ms", "others_cores"] {
        if let Some(v) = values.get(k) {
            off.insert(k.into(), *v);
        }
    }
    Ok(vec![
        BootResult {
            iommu: true,
            wall,
            values,
            line: r.line.clone(),
            log: log.clone(),
        },
        BootResult {
            iommu: false,
            wall,
            values: off,
            line: "(paired with the line above)".into(),
            log,
        },
    ])
}

/// USER_HZ: the unit of the utime and stime fields of `/proc/<pid>/stat`
/// (100 on x86 whatever the kernel's HZ).
const TICK_US: f64 = 10_000.0;

/// One measured stretch: the fields L1 printed at its start and end
/// marks.
struct Stretch<'a> {
    name: &'a str,
    start: &'a HashMap<String, String>,
    end: &'a HashMap<String, String>,
    /// Operations in the stretch (more than zero).
    ops: u64,
}

/// The stretches whose start and end marks L1 answered, in order: each end
/// mark with operations, paired with the last start mark of its name.
fn stretches<'a>(marks: impl IntoIterator<Item = &'a HashMap<String, String>>) -> Vec<Stretch<'a>> {
    let mut start: HashMap<&str, &HashMap<String, String>> = HashMap::new();
    let mut out = Vec::new();
    for m in marks {
        let (Some(name), Some(edge)) = (m.get("name"), m.get("edge")) else {
            continue;
        };
        match edge.as_str() {
            "start" => {
                start.insert(name, m);
            }
            "end" => {
                let ops: u64 = m.get("ops").and_then(|v| v.parse().ok()).unwrap_or(0);
                if let (Some(m0), true) = (start.get(name.as_str()), ops > 0) {
                    out.push(Stretch {
                        name,
                        start: m0,
                        end: m,
                        ops,
                    });
                }
            }
            _ => {}
        }
    }
    out
}

/// `<name>_cpu_us` (VMM CPU microseconds per operation) for every stretch
/// whose start and end marks L1 answered.
fn cpu_per_op(marks: &[HashMap<String, String>]) -> HashMap<String, f64> {
    let ticks = |m: &HashMap<String, String>| m.get("cpu_ticks")?.parse::<u64>().ok();
    stretches(marks.iter().filter(|m| ticks(m).is_some()))
        .into_iter()
        .filter_map(|s| {
            let (t0, t1) = (ticks(s.start)?, ticks(s.end)?);
            let us = t1.saturating_sub(t0) as f64 * TICK_US / s.ops as f64;
            Some((format!("{}_cpu_us", s.name), us))
        })
        .collect()
}

/// The virtio-iommu counters [`serving_per_op`] reports, each divided by
/// the stretch's operations, as `<stretch>_<name>`.
const SERVING: &[(&str, &str)] = &[
    ("requests", "iommu_req"),
    ("replies_inline", "inline"),
    ("replies_polled", "polled"),
    ("replies_thread", "thread"),
    ("thread_wakes", "wakes"),
    ("poll_looks", "looks"),
];

/// Stretches measured with marks, in the agent's order.
const STRETCHES: &[&str] = &["read4k", "read256k", "write4k", "qd32", "seq1m"];

/// From the counters at the marks ([`Outcome::vmm_counter_marks`]), per
/// stretch: each of [`SERVING`] per operation, and `<stretch>_poll_us`,
/// the polling time spent in looks that published, per polled reply.
fn serving_per_op(marks: &[HashMap<String, String>]) -> HashMap<String, f64> {
    let num = |m: &HashMap<String, String>, k: &str| m.get(k).and_then(|v| v.parse::<f64>().ok());
    let mut out = HashMap::new();
    for s in stretches(marks.iter().filter(|m| num(m, "requests").is_some())) {
        let (name, ops) = (s.name, s.ops as f64);
        let delta = |k: &str| Some(num(s.end, k)? - num(s.start, k)?);
        for (counter, short) in SERVING {
            if let Some(d) = delta(counter) {
                out.insert(format!("{name}_{short}"), d / ops);
            }
        }
        if let (Some(us), Some(polled)) = (delta("poll_serving_us"), delta("replies_polled")) {
            if polled > 0.0 {
                out.insert(format!("{name}_poll_us"), us / polled);
            }
        }
    }
    out
}

/// Prefix of [`thread_cpu_per_op`]'s keys after the stretch's name.
const THREAD_KEY: &str = "_thread_cpu_us:";

/// From the threads' CPU ticks at the marks ([`Outcome::vmm_thread_marks`]),
/// per stretch and thread name (threads of one name summed): CPU
/// microseconds per operation, as `<stretch>_thread_cpu_us:<name>`. A
/// thread that started or ended inside the stretch counts from zero or
/// not at all.
fn thread_cpu_per_op(marks: &[HashMap<String, String>]) -> HashMap<String, f64> {
    let by_name = |m: &HashMap<String, String>| -> HashMap<String, u64> {
        let mut out: HashMap<String, u64> = HashMap::new();
        for (k, v) in m {
            if let (Some((name, _tid)), Ok(ticks)) = (k.rsplit_once('/'), v.parse::<u64>()) {
                *out.entry(name.to_string()).or_default() += ticks;
            }
        }
        out
    };
    let mut out = HashMap::new();
    for s in stretches(marks) {
        let t0 = by_name(s.start);
        for (thread, ticks) in by_name(s.end) {
            let before = t0.get(&thread).copied().unwrap_or(0);
            let us = ticks.saturating_sub(before) as f64 * TICK_US / s.ops as f64;
            out.insert(format!("{}{THREAD_KEY}{thread}", s.name), us);
        }
    }
    out
}

/// Per stretch, each thread's [`thread_cpu_per_op`] figure, mean over the
/// iommu=on and over the iommu=off boots, busiest first; empty without
/// them.
fn thread_summary(results: &[BootResult]) -> String {
    let mut s = String::new();
    for stretch in STRETCHES {
        let prefix = format!("{stretch}{THREAD_KEY}");
        let mut names: Vec<&str> = results
            .iter()
            .flat_map(|r| r.values.keys())
            .filter_map(|k| k.strip_prefix(prefix.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        let side = |name: &str, on: bool| -> Option<f64> {
            let v: Vec<f64> = results
                .iter()
                .filter(|r| r.iommu == on)
                .filter_map(|r| r.values.get(&format!("{prefix}{name}")).copied())
                .collect();
            mean(&v)
        };
        let mut rows: Vec<(&str, Option<f64>, Option<f64>)> = names
            .into_iter()
            .map(|n| (n, side(n, true), side(n, false)))
            .filter(|(_, on, off)| on.unwrap_or(0.0) + off.unwrap_or(0.0) > 0.0)
            .collect();
        rows.sort_by(|a, b| b.1.unwrap_or(0.0).total_cmp(&a.1.unwrap_or(0.0)));
        if rows.is_empty() {
            continue;
        }
        if s.is_empty() {
            s.push_str(
                "VMM CPU per operation by thread (µs; mean over boots; iommu=on | iommu=off):\n",
            );
        }
        s.push_str(&format!("{stretch}:"));
        for (name, on, off) in rows {
            s.push_str(&format!(" {name} {} | {};", fmt_num(on), fmt_num(off)));
        }
        s.push('\n');
    }
    s
}

/// The iommu=on boots' [`serving_per_op`] figures, mean over boots, one
/// row per stretch; empty without them.
fn serving_summary(results: &[BootResult]) -> String {
    let columns: Vec<&str> = SERVING
        .iter()
        .map(|(_, short)| *short)
        .chain(["poll_us"])
        .collect();
    let mut s = String::new();
    for stretch in STRETCHES {
        let cells: Vec<Option<f64>> = columns
            .iter()
            .map(|c| {
                let v: Vec<f64> = results
                    .iter()
                    .filter(|r| r.iommu)
                    .filter_map(|r| r.values.get(&format!("{stretch}_{c}")).copied())
                    .collect();
                mean(&v)
            })
            .collect();
        if cells.iter().all(Option::is_none) {
            continue;
        }
        if s.is_empty() {
            s.push_str(
                "IOMMU serving per operation (iommu=on boots, mean; ch-remote counters; \
                 poll_us = polling time in looks that published, per polled reply):\n",
            );
            s.push_str(&format!("{:<10}", "stretch"));
            for c in &columns {
                s.push_str(&format!(" {c:>9}"));
            }
            s.push('\n');
        }
        s.push_str(&format!("{stretch:<10}"));
        for v in cells {
            s.push_str(&format!(" {:>9}", fmt_num(v)));
        }
        s.push('\n');
    }
    s
}

fn mean(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        None
    } else {
        Some(v.iter().sum::<f64>() / v.len() as f64)
    }
}

fn fmt_num(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    }
}

/// Per metric: mean over on boots, mean over off boots, ratio, spreads.
fn summary(results: &[BootResult]) -> String {
    let mut s = format!(
        "{:<16} {:>10} {:>10} {:>7}   {}\n",
        "metric", "iommu=on", "iommu=off", "ratio", "range on | off (min..max over boots)"
    );
    for m in METRICS {
        let pick = |on: bool| -> Vec<f64> {
            results
                .iter()
                .filter(|r| r.iommu == on)
                .filter_map(|r| r.values.get(*m).copied())
                .collect()
        };
        let (on, off) = (pick(true), pick(false));
        let range = |v: &[f64]| -> String {
            let min = v.iter().copied().reduce(f64::min);
            let max = v.iter().copied().reduce(f64::max);
            format!("{}..{}", fmt_num(min), fmt_num(max))
        };
        let ratio = match (mean(&on), mean(&off)) {
            _ if *m == "others_cores" => "-".into(),
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        s.push_str(&format!(
            "{:<16} {:>10} {:>10} {:>7}   {} | {}\n",
            m,
            fmt_num(mean(&on)),
            fmt_num(mean(&off)),
            ratio,
            range(&on),
            range(&off)
        ));
    }
    s
}

fn per_boot_header() -> String {
    format!(
        "{:<4} {:<5} {:>7} {:>6} {:>8} {:>9} {:>10} {:>11} {:>10} {:>6} {:>7} {:>7}",
        "boot",
        "iommu",
        "wall_s",
        "others",
        "init_ms",
        "l2init_ms",
        "read4k_us",
        "read256k_us",
        "write4k_us",
        "n4k",
        "n256k",
        "nw4k"
    )
}

fn per_boot_row(i: usize, r: &BootResult) -> String {
    let g = |k: &str| fmt_num(r.values.get(k).copied());
    format!(
        "{:<4} {:<5} {:>7.1} {:>6} {:>8} {:>9} {:>10} {:>11} {:>10} {:>6} {:>7} {:>7}",
        i + 1,
        if r.iommu { "on" } else { "off" },
        r.wall.as_secs_f64(),
        g("others_cores"),
        g("init_ms"),
        g("l2init_ms"),
        g("read4k_us"),
        g("read256k_us"),
        g("write4k_us"),
        g("read4k_n"),
        g("read256k_n"),
        g("write4k_n"),
    )
}

/// The command as run, with the bed's environment knobs that are set.
fn command_line() -> String {
    let mut env: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("VIRTIO_IOMMU_"))
        .map(|(k, v)| format!("{k}={}", guest_tests::sh_quote(&v)))
        .collect();
    env.sort();
    let argv: Vec<String> = std::env::args()
        .map(|a| {
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=./,:".contains(c))
            {
                a
            } else {
                guest_tests::sh_quote(&a)
            }
        })
        .collect();
    env.extend(argv);
    env.join(" ")
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse_args(&args) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("guest-perf: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if (o.counters || o.threads) && (!o.cpu || o.paired) {
        eprintln!("guest-perf: --counters and --threads read at the CPU marks: not with --no-cpu or --paired");
        return ExitCode::from(2);
    }
    let bed = match Bed::get() {
        Ok(b) => b,
        Err(reason) => {
            println!("SKIP: guest-perf: {reason}");
            return ExitCode::SUCCESS;
        }
    };
    let images = std::fs::canonicalize(&bed.images.dir).unwrap_or(bed.images.dir.clone());
    println!("command: {}", command_line());
    println!(
        "vmm={} route={:?} images={} boots={}x(on,off) cpus={} disk=perf {} MiB params=[{}] \
         guest={} host_busy_threads={} disk_opts={}",
        bed.vmm.display(),
        bed.route,
        images.display(),
        o.boots,
        o.cpus,
        o.disk_mib,
        o.params.join(" "),
        if o.lazy {
            "lazy(iommu.strict=0)"
        } else {
            "strict(iommu.strict=1)"
        },
        o.busy,
        o.disk_opts.as_deref().unwrap_or("-")
    );
    // SAFETY: getpriority has no memory-safety preconditions.
    let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    if nice > 0 {
        println!(
            "warning: running at nice {nice}; QEMU/the VMM run at nice {} and lose CPU to other work",
            (nice + 10).min(19)
        );
    }
    println!(
        "others = CPUs used by other processes on this host during the boot (of {})",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let t0 = Instant::now();
    let mut results: Vec<BootResult> = Vec::new();
    let mut failed = None;
    'outer: for i in 0..o.boots {
        for k in 0..if o.paired { 1 } else { 2 } {
            let iommu = (k == 0) == o.first_on;
            eprintln!(
                "guest-perf: round {}/{} iommu={} ...",
                i + 1,
                o.boots,
                if iommu { "on" } else { "off" }
            );
            wait_quiet(&o);
            match one_boot(&bed, &o, iommu) {
                Ok(rs) => {
                    for r in rs {
                        eprintln!("guest-perf: {}", r.line);
                        results.push(r);
                    }
                }
                Err(e) => {
                    failed = Some(format!(
                        "round {} iommu={}: {e}",
                        i + 1,
                        if iommu { "on" } else { "off" }
                    ));
                    break 'outer;
                }
            }
        }
    }
    println!();
    println!("{}", per_boot_header());
    for (i, r) in results.iter().enumerate() {
        println!("{}", per_boot_row(i, r));
    }
    println!();
    print!("{}", summary(&results));
    print!("{}", serving_summary(&results));
    print!("{}", thread_summary(&results));
    println!();
    println!("agent lines:");
    for r in &results {
        println!("  {}  (log {})", r.line, r.log);
    }
    println!(
        "total wall time {:.1}s for {} boots",
        t0.elapsed().as_secs_f64(),
        results.len()
    );
    println!("{}", summary_line(&o, &bed, &results));
    match failed {
        Some(e) => {
            println!("FAILED: guest-perf: {e}");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}

/// One line of `key=value` words: the configuration, then per metric the
/// means over on and off boots and their ratio.
fn summary_line(o: &Opts, bed: &Bed, results: &[BootResult]) -> String {
    let mut s = format!(
        "PERF-SUMMARY vmm={} method={} guest={} cpus={} busy={} boots={}",
        bed.vmm.display(),
        if o.paired { "paired" } else { "alternating" },
        if o.lazy { "lazy" } else { "strict" },
        o.cpus,
        o.busy,
        o.boots
    );
    for m in METRICS {
        let mean_of = |on: bool| {
            mean(
                &results
                    .iter()
                    .filter(|r| r.iommu == on)
                    .filter_map(|r| r.values.get(*m).copied())
                    .collect::<Vec<_>>(),
            )
        };
        let (on, off) = (mean_of(true), mean_of(false));
        if let Some(v) = on {
            s.push_str(&format!(" {m}_on={v:.1}"));
        }
        if let Some(v) = off {
            s.push_str(&format!(" {m}_off={v:.1}"));
        }
        if let (Some(a), Some(b), false) = (on, off, *m == "others_cores") {
            if b > 0.0 {
                s.push_str(&format!(" {m}_ratio={:.2}", a / b));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn cpu_per_op_pairs_the_marks_of_each_stretch() {
        let mark = |name: &str, edge: &str, ops: u64, ticks: u64| -> HashMap<String, String> {
            [
                ("name", name.to_string()),
                ("edge", edge.into()),
                ("ops", ops.to_string()),
                ("cpu_ticks", ticks.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        };
        let got = cpu_per_op(&[
            mark("read4k", "start", 0, 100),
            mark("read4k", "end", 1000, 150),
            mark("qd32", "start", 0, 150),
            // No end: a stretch L1 did not see finish gives no figure.
        ]);
        assert_eq!(got.len(), 1);
        assert_eq!(got["read4k_cpu_us"], 500.0);
    }

    #[test]
    fn serving_per_op_divides_each_counters_change_by_the_stretchs_operations() {
        let line = |l: &str| guest_tests::parse_kv(l);
        let got = serving_per_op(&[
            line("L1-COUNTERS requests=100 replies_inline=10 replies_polled=90 replies_thread=0 \
                  thread_wakes=10 poll_looks=1000 poll_serving_us=900 name=read4k edge=start ops=0"),
            line("L1-COUNTERS requests=700 replies_inline=20 replies_polled=680 replies_thread=0 \
                  thread_wakes=20 poll_looks=9000 poll_serving_us=12700 name=read4k edge=end ops=100"),
            // Without the IOMMU's counters (an iommu=off boot): nothing.
            line("L1-COUNTERS name=write4k edge=start ops=0"),
            line("L1-COUNTERS name=write4k edge=end ops=50"),
        ]);
        assert_eq!(got["read4k_iommu_req"], 6.0);
        assert_eq!(got["read4k_inline"], 0.1);
        assert_eq!(got["read4k_polled"], 5.9);
        assert_eq!(got["read4k_wakes"], 0.1);
        assert_eq!(got["read4k_looks"], 80.0);
        assert_eq!(got["read4k_poll_us"], 20.0);
        assert!(!got.keys().any(|k| k.starts_with("write4k")), "{got:?}");
    }

    #[test]
    fn thread_cpu_per_op_sums_the_threads_of_one_name() {
        let line = |l: &str| guest_tests::parse_kv(l);
        let got = thread_cpu_per_op(&[
            line("L1-THREADS vmm/1=10 vcpu0/2=100 blk/3=5 blk/4=5 name=read4k edge=start ops=0"),
            // Thread 5 started inside the stretch: it counts from zero.
            line("L1-THREADS vmm/1=10 vcpu0/2=200 blk/3=15 blk/4=25 blk/5=10 name=read4k edge=end ops=100"),
        ]);
        assert_eq!(got["read4k_thread_cpu_us:vcpu0"], 10_000.0);
        assert_eq!(got["read4k_thread_cpu_us:blk"], 4_000.0);
        assert_eq!(got["read4k_thread_cpu_us:vmm"], 0.0);
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn args() {
        let o = parse_args(&words("--boots 2 --first off n4k=10 --cpus 2")).unwrap();
        assert_eq!(o.boots, 2);
        assert!(!o.first_on);
        assert_eq!(o.cpus, 2);
        assert_eq!(o.params, vec!["n4k=10".to_string()]);
        assert!(!o.paired);
        assert!(parse_args(&words("--paired")).unwrap().paired);
        let b = parse_args(&words("--lazy --busy 1 --no-cpu")).unwrap();
        assert_eq!((b.lazy, b.busy, b.cpu), (true, 1, false));
        assert_eq!(
            parse_args(&words("--disk-opts _disable_io_uring=on"))
                .unwrap()
                .disk_opts
                .as_deref(),
            Some("_disable_io_uring=on")
        );
        let d = parse_args(&[]).unwrap();
        assert_eq!((d.boots, d.cpus, d.disk_mib, d.first_on), (3, 1, 256, true));
        assert!(parse_args(&words("--boots")).is_err());
        assert!(parse_args(&words("--bogus")).is_err());
        assert_eq!(parse_args(&words("--help")), Err(String::new()));
    }

    #[test]
    fn summary_ratio() {
        let mk = |iommu: bool, us: f64| BootResult {
            iommu,
            wall: Duration::from_secs(1),
            values: HashMap::from([("read4k_us".to_string(), us)]),
            line: String::new(),
            log: String::new(),
        };
        let rs = vec![
            mk(true, 30.0),
            mk(false, 10.0),
            mk(true, 50.0),
            mk(false, 10.0),
        ];
        let s = summary(&rs);
        let line = s.lines().find(|l| l.starts_with("read4k_us ")).unwrap();
        assert!(line.contains(" 40.0 "), "{line}");
        assert!(line.contains("4.00x"), "{line}");
        assert!(line.contains("30.0..50.0 | 10.0..10.0"), "{line}");
        let init = s.lines().find(|l| l.starts_with("init_ms ")).unwrap();
        assert!(init.contains(" - "), "{init}");
    }
}
