//! guest-agent: runs inside the L2 test guest and prints machine-readable
//! result lines on stdout (the serial console).
//!
//! Usage: `guest-agent [SCENARIO]`; without an argument the scenario and its
//! parameters come from the kernel command line (`scenario=NAME key=value`).
//! Every scenario ends with one line
//! `AGENT-RESULT scenario=<name> status=pass|fail [key=value...]`.

mod blocked;
mod disks;
mod faults;
mod fence;
mod indirect;
mod map_limit;
mod perf;
mod scenarios;
mod soak;
mod vfio;
mod virtio;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// What the agent is doing right now (reported by the watchdog).
static PHASE: Mutex<&str> = Mutex::new("start");
/// A progress counter (rounds, cycles), reported by the watchdog.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Records the current phase and progress counter for the watchdog.
pub fn phase(p: &'static str, progress: u64) {
    *PHASE.lock().unwrap_or_else(|e| e.into_inner()) = p;
    PROGRESS.store(progress, Ordering::Relaxed);
}

/// After `secs`, reports a failure naming the phase the agent is stuck in
/// and exits, so a hang shows up as a result line rather than a timeout.
fn start_watchdog(scenario: String, secs: u64) {
    if secs == 0 {
        return;
    }
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        let p = *PHASE.lock().unwrap_or_else(|e| e.into_inner());
        say(&format!(
            "AGENT-RESULT scenario={scenario} status=fail error=\"watchdog: no result after {secs}s, phase={p} progress={}\"",
            PROGRESS.load(Ordering::Relaxed)
        ));
        std::process::exit(2);
    });
}

pub type Res<T> = Result<T, String>;

/// Formats the last OS error with some context.
pub fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

pub fn write_file(path: &str, s: &str) -> Res<()> {
    std::fs::write(path, s).map_err(|e| format!("write {path:?} to {s:?}: {e}"))
}

/// Parameters from the kernel command line (`key=value` words).
pub struct Params {
    map: HashMap<String, String>,
}

impl Params {
    pub fn from_cmdline(s: &str) -> Self {
        let map = s
            .split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self { map }
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.map.get(k).map(String::as_str)
    }

    pub fn num(&self, k: &str, default: u64) -> u64 {
        self.get(k).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
}

/// Prints one line and flushes (the console is the only channel out).
pub fn say(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn main() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let params = Params::from_cmdline(&cmdline);
    let arg = std::env::args().nth(1);
    let scenario = arg
        .as_deref()
        .or(params.get("scenario"))
        .unwrap_or("none")
        .to_string();
    if scenario != "kvm-check" && scenario != "kvm-hold" {
        say(&format!("AGENT-START scenario={scenario}"));
    }
    start_watchdog(scenario.clone(), params.num("watchdog", 0));
    let result = match scenario.as_str() {
        "probe" => scenarios::probe(&params),
        "integrity" => scenarios::integrity(&params),
        "dma-race" => scenarios::dma_race(&params),
        "churn" => scenarios::churn(&params),
        "unmap-blocked" => blocked::unmap_blocked(&params),
        "map-limit" => map_limit::map_limit(&params),
        "indirect" => indirect::indirect(&params),
        "faults" => faults::faults(&params),
        "soak" => soak::soak(&params),
        "perf" => perf::perf(&params),
        "kvm-check" => scenarios::kvm_check(),
        "kvm-hold" => scenarios::kvm_hold(),
        "boot" => scenarios::boot(),
        other => Err(format!("unknown scenario {other:?}")),
    };
    match result {
        Ok(extra) => {
            let tail = if extra.is_empty() {
                String::new()
            } else {
                format!(" {extra}")
            };
            say(&format!(
                "AGENT-RESULT scenario={scenario} status=pass{tail}"
            ));
        }
        Err(e) => {
            let e = e.replace('\n', " ");
            say(&format!(
                "AGENT-RESULT scenario={scenario} status=fail error=\"{e}\""
            ));
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Params;

    #[test]
    fn params_parse() {
        let p = Params::from_cmdline("console=ttyS0 quiet scenario=dma-race rounds=7\n");
        assert_eq!(p.get("scenario"), Some("dma-race"));
        assert_eq!(p.num("rounds", 1), 7);
        assert_eq!(p.num("missing", 3), 3);
        assert_eq!(p.get("quiet"), None);
    }
}
