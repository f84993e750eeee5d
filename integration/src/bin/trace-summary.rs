//! trace-summary: per-request phase costs of the block devices from a
//! `VMM_TRACE` dump (the `TRACE <ns> <event> <arg> <cpu>` lines the VMM
//! prints on stderr when the VM stops; any prefix before `TRACE` is
//! ignored, so a nested bed's serial log works as is).
//!
//! ```text
//! trace-summary LOG...     # or read stdin
//! ```
//!
//! For disks behind the IOMMU and outside it separately, it prints the
//! median, 90th percentile and mean of:
//! - `kick->popped`: from the queue thread's wake-up to the chain being
//!   popped (available-ring reads);
//! - `popped->queued`: parsing (descriptor walk, header read, pins);
//! - `iodone->done`: publishing (status byte, used entry, notification
//!   check), after the I/O.

use std::collections::HashMap;
use std::io::BufRead;

use vmm::trace::{Event, BLK_IOMMU};

#[derive(Default)]
struct Class {
    last_kick: Option<u64>,
    popped: HashMap<u64, u64>,
    io_done: HashMap<u64, u64>,
    kick_to_popped: Vec<u64>,
    popped_to_queued: Vec<u64>,
    iodone_to_done: Vec<u64>,
}

fn parse(line: &str) -> Option<(u64, u16, u64)> {
    let rest = &line[line.find("TRACE ")? + 6..];
    let mut w = rest.split_whitespace();
    let ns = w.next()?.parse().ok()?;
    let ev = w.next()?.parse().ok()?;
    let arg = u64::from_str_radix(w.next()?.trim_start_matches("0x"), 16).ok()?;
    Some((ns, ev, arg))
}

fn stats(name: &str, v: &mut [u64]) -> String {
    if v.is_empty() {
        return format!("  {name:<16} n=0");
    }
    v.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let mean = v.iter().sum::<u64>() / v.len() as u64;
    format!(
        "  {name:<16} n={:<6} median={:>8.1}us p90={:>8.1}us mean={:>8.1}us",
        v.len(),
        us(v[v.len() / 2]),
        us(v[v.len() * 9 / 10]),
        us(mean)
    )
}

fn main() {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    let mut readers: Vec<Box<dyn BufRead>> = Vec::new();
    if paths.is_empty() {
        readers.push(Box::new(std::io::stdin().lock()));
    }
    for p in &paths {
        match std::fs::File::open(p) {
            Ok(f) => readers.push(Box::new(std::io::BufReader::new(f))),
            Err(e) => {
                eprintln!("trace-summary: {p}: {e}");
                std::process::exit(2);
            }
        }
    }
    let mut classes: [Class; 2] = Default::default();
    let mut events = 0u64;
    for r in readers {
        // One log is one VMM run: its heads and timestamps start afresh.
        let mut per_log: [Class; 2] = Default::default();
        for line in r.lines().map_while(Result::ok) {
            let Some((ns, ev, arg)) = parse(&line) else {
                continue;
            };
            events += 1;
            let c = &mut per_log[usize::from(arg & BLK_IOMMU != 0)];
            let head = arg & 0xffff;
            match ev {
                e if e == Event::BlkKick as u16 => c.last_kick = Some(ns),
                e if e == Event::BlkPopped as u16 => {
                    if let Some(k) = c.last_kick.take() {
                        c.kick_to_popped.push(ns.saturating_sub(k));
                    }
                    c.popped.insert(head, ns);
                }
                e if e == Event::BlkQueued as u16 => {
                    if let Some(p) = c.popped.remove(&head) {
                        c.popped_to_queued.push(ns.saturating_sub(p));
                    }
                }
                e if e == Event::BlkIoDone as u16 => {
                    c.io_done.insert(head, ns);
                }
                e if e == Event::BlkDone as u16 => {
                    let head = (arg & 0x1_ffff) >> 1;
                    if let Some(d) = c.io_done.remove(&head) {
                        c.iodone_to_done.push(ns.saturating_sub(d));
                    }
                }
                _ => {}
            }
        }
        for (all, one) in classes.iter_mut().zip(per_log) {
            all.kick_to_popped.extend(one.kick_to_popped);
            all.popped_to_queued.extend(one.popped_to_queued);
            all.iodone_to_done.extend(one.iodone_to_done);
        }
    }
    println!("trace-summary: {events} events");
    for (name, c) in ["iommu=off", "iommu=on"].iter().zip(classes.iter_mut()) {
        println!("{name}:");
        println!("{}", stats("kick->popped", &mut c.kick_to_popped));
        println!("{}", stats("popped->queued", &mut c.popped_to_queued));
        println!("{}", stats("iodone->done", &mut c.iodone_to_done));
    }
}
