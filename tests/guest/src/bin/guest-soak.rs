//! guest-soak: boots L2 many times in a row inside one L1 boot and counts
//! the runs in which L2 died without its result (a triple fault, or a hang
//! that the per-run timeout ended). For the nested bed's reliability: one
//! L1 boot for all runs makes each run cost only the L2 boot and the
//! scenario.
//!
//! ```text
//! VIRTIO_IOMMU_TEST_VMM=/path/to/vmm \
//!   cargo run --release -p guest-tests --bin guest-soak -- --runs 30 --scenario boot
//! ```
//!
//! Options: `--runs N` (20), `--scenario NAME` (boot), `--cpus N` (1),
//! `--run-timeout SECS` (60; the VMM gets SIGTERM then, and a VMM that
//! reports on SIGTERM says where the vCPUs were), `--disk ID:MIB:on|off`
//! (repeatable; e.g. `--disk d0:64:on` for churn), and `key=value` words for
//! the agent. Prints one line per run, the report lines of every lost run
//! (the VMM's warnings: vCPU state, stalls), and a summary. Exit status 0
//! unless the bed could not run at all.

use guest_tests::{report_timing, Bed, CliWords, DiskSpec, Scenario};
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage: guest-soak [--runs N] [--scenario NAME] [--cpus N] \
[--run-timeout SECS] [--disk ID:MIB:on|off]... [key=value...]";

#[derive(Debug)]
struct Opts {
    runs: u32,
    scenario: String,
    cpus: u32,
    run_timeout: Duration,
    disks: Vec<DiskSpec>,
    params: Vec<String>,
}

fn parse_disk(v: &str) -> Result<DiskSpec, String> {
    let parts: Vec<&str> = v.split(':').collect();
    let [id, mib, iommu] = parts[..] else {
        return Err(format!("--disk {v:?}: expected ID:MIB:on|off"));
    };
    let mib: u64 = mib
        .parse()
        .map_err(|_| format!("--disk {v:?}: size is not a number"))?;
    let iommu = match iommu {
        "on" => true,
        "off" => false,
        _ => return Err(format!("--disk {v:?}: expected on or off")),
    };
    Ok(DiskSpec::new(id, mib.max(2), iommu))
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        runs: 20,
        scenario: "boot".into(),
        cpus: 1,
        run_timeout: Duration::from_secs(60),
        disks: Vec::new(),
        params: Vec::new(),
    };
    let mut w = CliWords::new(args);
    while let Some(a) = w.next_word() {
        match a {
            "--runs" => o.runs = w.number(a)?.clamp(1, 10_000) as u32,
            "--scenario" => o.scenario = w.value(a)?,
            "--cpus" => o.cpus = w.number(a)?.clamp(1, 8) as u32,
            "--run-timeout" => o.run_timeout = Duration::from_secs(w.number(a)?.max(10)),
            "--disk" => o.disks.push(parse_disk(&w.value(a)?)?),
            "-h" | "--help" => return Err(String::new()),
            p if CliWords::is_agent_param(p) => o.params.push(p.to_string()),
            p => return Err(format!("unknown argument {p:?}")),
        }
    }
    Ok(o)
}

/// What became of one run.
#[derive(Debug, PartialEq, Eq)]
enum RunResult {
    Pass,
    /// The agent reported, but not a pass.
    Fail,
    /// No result: L2 died or hung.
    Lost,
}

/// One run's lines (between its `L1-ITER start` and the next).
struct Run<'a> {
    index: u32,
    lines: &'a [String],
}

impl Run<'_> {
    fn result(&self, scenario: &str) -> RunResult {
        let tag = format!("scenario={scenario} ");
        match self
            .lines
            .iter()
            .find(|l| l.contains("AGENT-RESULT ") && l.contains(&tag))
        {
            Some(l) if l.contains("status=pass") => RunResult::Pass,
            Some(_) => RunResult::Fail,
            None => RunResult::Lost,
        }
    }

    fn field(&self, prefix: &str, key: &str) -> Option<String> {
        let l = self
            .lines
            .iter()
            .find_map(|l| l.find(prefix).map(|i| &l[i..]))?;
        guest_tests::parse_kv(l).get(key).cloned()
    }

    /// How the lost run ended, and what the VMM said about it.
    fn post_mortem(&self) -> Vec<String> {
        let mut out = vec![format!(
            "vmm_exit={} triple_fault={} l2_init={}",
            self.field("L1-ITER end", "vmm_exit").unwrap_or("?".into()),
            self.lines.iter().any(|l| l.contains("triple fault")),
            self.lines.iter().any(|l| l.contains("L2-INIT start")),
        )];
        out.extend(
            self.lines
                .iter()
                .filter(|l| {
                    l.contains("WARN")
                        || l.contains("ERROR")
                        || l.contains("vmm:")
                        || l.contains("] ") && (l.contains("BUG") || l.contains("rcu"))
                })
                .take(12)
                .cloned(),
        );
        out
    }
}

fn split_runs(lines: &[String]) -> Vec<Run<'_>> {
    let starts: Vec<(usize, u32)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let at = l.find("L1-ITER start")?;
            let n = guest_tests::parse_kv(&l[at..]).get("i")?.parse().ok()?;
            Some((i, n))
        })
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(k, &(i, index))| {
            let end = starts.get(k + 1).map_or(lines.len(), |&(j, _)| j);
            Run {
                index,
                lines: &lines[i..end],
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("guest-soak: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let bed = match Bed::get() {
        Ok(b) => b,
        Err(r) => {
            guest_tests::skip("guest-soak", &r);
            return ExitCode::SUCCESS;
        }
    };
    if bed.route != guest_tests::Route::Nested {
        guest_tests::skip("guest-soak", "repeated runs need the nested route");
        return ExitCode::SUCCESS;
    }
    let mut s = Scenario::new(&o.scenario);
    s.cpus = o.cpus;
    s.disks = o.disks.clone();
    s.params = o.params.clone();
    s.repeat = o.runs;
    s.run_timeout = o.run_timeout;
    s.timeout = (o.run_timeout + Duration::from_secs(10)) * o.runs + Duration::from_secs(120);
    println!(
        "guest-soak: vmm={} scenario={} cpus={} runs={} run_timeout={}s",
        bed.vmm.display(),
        o.scenario,
        o.cpus,
        o.runs,
        o.run_timeout.as_secs()
    );
    let out = match bed.run_once(&s) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("guest-soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    report_timing("guest-soak", &out);
    let runs = split_runs(&out.lines);
    let (mut pass, mut fail, mut lost) = (0, 0, 0);
    for r in &runs {
        let res = r.result(&o.scenario);
        let secs = match (
            r.field("L1-ITER start", "uptime")
                .and_then(|v| v.parse::<f64>().ok()),
            r.field("L1-ITER end", "uptime")
                .and_then(|v| v.parse::<f64>().ok()),
        ) {
            (Some(a), Some(b)) => format!("{:.1}s", b - a),
            _ => "?".into(),
        };
        println!("run {:>3}: {res:?} {secs}", r.index);
        match res {
            RunResult::Pass => pass += 1,
            RunResult::Fail => fail += 1,
            RunResult::Lost => {
                lost += 1;
                for l in r.post_mortem() {
                    println!("    {l}");
                }
            }
        }
    }
    let missing = o.runs as usize - runs.len().min(o.runs as usize);
    println!(
        "guest-soak: scenario={} runs={} pass={pass} fail={fail} lost={lost} not_run={missing} \
         (L1 ended early: {}) log {}",
        o.scenario,
        o.runs,
        missing > 0,
        out.log_path.display()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn runs_are_split_and_classified() {
        let l = lines(&[
            "L1-ITER start i=1 uptime=5.0",
            "AGENT-RESULT scenario=boot status=pass cpus=0",
            "L1-ITER end i=1 vmm_exit=0 uptime=12.5",
            "L1-ITER start i=2 uptime=12.6",
            "[WARN  vmm::vm] vCPU 0: mp_state=3 rip=0xffffffff81000000",
            "L1-ITER end i=2 vmm_exit=143 uptime=72.6",
            "L1-ITER start i=3 uptime=72.7",
            "AGENT-RESULT scenario=boot status=fail",
        ]);
        let runs = split_runs(&l);
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].result("boot"), RunResult::Pass);
        assert_eq!(runs[1].result("boot"), RunResult::Lost);
        assert_eq!(runs[2].result("boot"), RunResult::Fail);
        let pm = runs[1].post_mortem();
        assert!(pm[0].starts_with("vmm_exit=143 triple_fault=false"));
        assert!(pm[1].contains("vCPU 0"));
    }

    #[test]
    fn disk_option() {
        let d = parse_disk("d0:64:on").unwrap();
        assert_eq!((d.id.as_str(), d.size_mib, d.iommu), ("d0", 64, true));
        assert!(parse_disk("d0:64").is_err());
        assert!(parse_disk("d0:x:on").is_err());
        assert!(parse_disk("d0:64:maybe").is_err());
    }
}
