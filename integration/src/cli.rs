//! Command line in Cloud Hypervisor's dialect.
//!
//! clap parses the flags; the `key=value,...` option strings are parsed and
//! validated here so that errors name the offending option.

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::config::{
    DeviceConfig, DiskConfig, IommuOptions, MemoryConfig, PlatformConfig, SerialMode, VmConfig,
    DEFAULT_QUEUE_SIZE,
};

/// Raw command line, as clap sees it.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "vmm",
    version,
    about = "Small KVM VMM (Cloud Hypervisor CLI dialect)"
)]
pub struct Args {
    /// Guest kernel: ELF vmlinux with a PVH note, or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initramfs loaded next to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// vCPUs: boot=N.
    #[arg(long, value_name = "boot=N", default_value = "boot=1")]
    pub cpus: String,
    /// Guest RAM: size=512M|1G|...,prefault=on|off,shared=on|off (both
    /// optional, off by default).
    /// prefault=on allocates all of it and maps it into KVM's stage-2 page
    /// tables before the guest runs (the guest then takes no nested page
    /// faults for RAM). shared=on backs it by a memfd mapped shared (as
    /// Cloud Hypervisor's shared=on) instead of private anonymous memory.
    #[arg(
        long,
        value_name = "size=SIZE[,prefault=on][,shared=on]",
        default_value = "size=512M"
    )]
    pub memory: String,
    /// Disks: path=..,iommu=on|off,readonly=on|off,image_type=raw,
    /// id=NAME,queue_size=N,num_queues=N,direct=on|off (one or more; a
    /// raw image file or a block device, locked while the VMM runs;
    /// direct=on bypasses the host page cache). The I/O goes through one
    /// io_uring per queue, or worker threads where io_uring is
    /// unavailable or _disable_io_uring=on. Fault injection for tests:
    /// delay_us=N holds every request N microseconds before its I/O;
    /// fail_every=N fails every Nth request with VIRTIO_BLK_S_IOERR;
    /// stall_at=SECTOR holds every read or write that covers SECTOR until
    /// the IOMMU revokes it (a backend that never completes).
    #[arg(long, value_name = "DISK", num_args = 1.., action = clap::ArgAction::Append)]
    pub disk: Vec<String>,
    /// Host PCI devices passed through with VFIO:
    /// path=/sys/bus/pci/devices/BDF, iommu=on|off, id=NAME (one or more).
    /// The device must be bound to vfio-pci, in a viable IOMMU group. With
    /// iommu=on it sits behind the virtio-iommu, and the guest's MAP and
    /// UNMAP requests program its VFIO container; with iommu=off all of
    /// guest RAM is mapped for it at boot. Test control, UNSAFE:
    /// _skip_container_unmap=on acknowledges UNMAPs without unmapping.
    #[arg(long, value_name = "DEVICE", num_args = 1.., action = clap::ArgAction::Append)]
    pub device: Vec<String>,
    /// Serial port (COM1, 0x3f8, IRQ 4): tty|file=PATH|null|off.
    #[arg(long, value_name = "tty|file=PATH|null|off", default_value = "tty")]
    pub serial: String,
    /// The virtio-iommu: poll_us=N polls the request queue for up to N µs
    /// after its last activity instead of waiting for kicks; the window
    /// adapts between 50 µs and N to the guest's gaps between bursts (0:
    /// no polling, requests are served inline on the notifying vCPU).
    /// Default 10000. idle_poll=on|off: poll a quiet queue at SCHED_IDLE
    /// priority (default off). inline_first=on|off: a kick exits to the
    /// vCPU, which serves the queue before it wakes the poller, and the
    /// vCPUs serve everything while the poller keeps losing its CPU (a
    /// busy host; default on). drain=off: UNSAFE control mode, reply to
    /// UNMAP/DETACH/ATTACH without waiting for in-flight DMA and never
    /// revoke cached ring translations, as upstream VMMs do (default on).
    /// fence_ms=N: when DMA that cannot be cancelled still holds an
    /// invalidation N ms after the revocation grace (100 ms), take its
    /// pages from the guest (vCPUs held, each page copied into a fresh
    /// one) and reply; needs direct=on on every iommu=on disk and no
    /// iommu=on passed-through device (default: wait for the DMA). Test
    /// control, UNSAFE: _fence_hold=off fences with the vCPUs running.
    #[arg(
        long,
        value_name = "poll_us=N[,idle_poll=on|off][,inline_first=on|off][,drain=on|off][,fence_ms=N]",
        default_value = "poll_us=10000"
    )]
    pub iommu: String,
    /// Platform: `iommu_segments=[0]` puts every device of PCI segment 0
    /// (the only one) behind the virtio-iommu; iommu_address_width=N (1 to
    /// 64, default 64) sets the IOMMU's input range; iommu_fence_ms=N is
    /// Cloud Hypervisor's name for `--iommu fence_ms=N`.
    #[arg(
        long,
        value_name = "iommu_segments=[0],iommu_address_width=N,iommu_fence_ms=N"
    )]
    pub platform: Option<String>,
    /// virtio-console: only "off" is supported.
    #[arg(long, value_name = "off", default_value = "off")]
    pub console: String,
}

/// Errors in option values; all map to exit status 2.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{opt}: {msg}")]
    Invalid { opt: &'static str, msg: String },
    #[error("--{opt}: file not found or not readable: {path}")]
    MissingFile { opt: &'static str, path: PathBuf },
}

fn invalid(opt: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        opt,
        msg: msg.into(),
    }
}

/// Parses one `--device` value.
pub fn parse_device(s: &str) -> Result<DeviceConfig, ConfigError> {
    let kv = split_kv(
        "device",
        s,
        &["path", "iommu", "id", "_skip_container_unmap"],
    )?;
    let mut path = None;
    let mut iommu = false;
    let mut id = None;
    let mut skip_container_unmap = false;
    for (k, v) in kv {
        match k {
            "path" if v.is_empty() => return Err(invalid("device", "path= is empty")),
            "path" => path = Some(PathBuf::from(v)),
            "iommu" => iommu = parse_on_off("device", k, v)?,
            "id" if v.is_empty() || v.contains(char::is_whitespace) => {
                return Err(invalid(
                    "device",
                    format!("id={v:?}: a name without spaces"),
                ))
            }
            "id" => id = Some(v.to_string()),
            "_skip_container_unmap" => skip_container_unmap = parse_on_off("device", k, v)?,
            _ => unreachable!("split_kv checked the key"),
        }
    }
    let path = path.ok_or_else(|| {
        invalid(
            "device",
            format!("{s:?}: path=/sys/bus/pci/devices/<BDF> is required"),
        )
    })?;
    Ok(DeviceConfig {
        path,
        iommu,
        id,
        skip_container_unmap,
    })
}

/// Largest guest RAM accepted (RAM above the 3 GiB..4 GiB hole is fine).
pub const MAX_MEM: u64 = 64 << 30;
/// Smallest guest RAM accepted.
pub const MIN_MEM: u64 = 32 << 20;
/// Most vCPUs accepted (APIC IDs fit in 8 bits, no x2APIC topology yet).
pub const MAX_CPUS: u8 = 64;

/// Splits `a=1,b=2` into pairs; a bare word becomes `(word, "")`.
fn split_kv<'a>(
    opt: &'static str,
    s: &'a str,
    known: &[&str],
) -> Result<Vec<(&'a str, &'a str)>, ConfigError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for part in s.split(',') {
        if part.is_empty() {
            return Err(invalid(opt, format!("empty option in {s:?}")));
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if !known.contains(&k) {
            return Err(invalid(
                opt,
                format!("unknown option {k:?} (known: {})", known.join(", ")),
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(invalid(opt, format!("option {k:?} given twice")));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn parse_on_off(opt: &'static str, key: &str, v: &str) -> Result<bool, ConfigError> {
    match v {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(invalid(opt, format!("{key}={v:?}: expected on or off"))),
    }
}

/// Parses a size such as `512M`, `1G`, `65536K` or a plain byte count.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// Parses `--cpus`.
pub fn parse_cpus(s: &str) -> Result<u8, ConfigError> {
    let kv = split_kv("cpus", s, &["boot"])?;
    let mut boot = 1u8;
    for (k, v) in kv {
        if k == "boot" {
            boot = v
                .parse::<u8>()
                .ok()
                .filter(|n| (1..=MAX_CPUS).contains(n))
                .ok_or_else(|| invalid("cpus", format!("boot={v:?}: expected 1..={MAX_CPUS}")))?;
        }
    }
    Ok(boot)
}

/// Parses `--memory`.
pub fn parse_memory(s: &str) -> Result<MemoryConfig, ConfigError> {
    let kv = split_kv("memory", s, &["size", "prefault", "shared"])?;
    let mut size = None;
    let mut prefault = false;
    let mut shared = false;
    for (k, v) in kv {
        match k {
            "size" => {
                let n = parse_size(v).ok_or_else(|| {
                    invalid("memory", format!("size={v:?}: expected e.g. 512M or 1G"))
                })?;
                if !(MIN_MEM..=MAX_MEM).contains(&n) {
                    return Err(invalid(
                        "memory",
                        format!("size={v}: must be between 32M and 64G"),
                    ));
                }
                if n % 4096 != 0 {
                    return Err(invalid("memory", format!("size={v}: not a multiple of 4K")));
                }
                size = Some(n);
            }
            "prefault" => prefault = parse_on_off("memory", k, v)?,
            "shared" => shared = parse_on_off("memory", k, v)?,
            _ => unreachable!("split_kv checked the key"),
        }
    }
    let size = size.ok_or_else(|| invalid("memory", "size=... is required"))?;
    Ok(MemoryConfig {
        size,
        prefault,
        shared,
    })
}

/// Parses one `--disk` value.
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let kv = split_kv(
        "disk",
        s,
        &[
            "path",
            "iommu",
            "readonly",
            "image_type",
            "delay_us",
            "fail_every",
            "stall_at",
            "id",
            "queue_size",
            "num_queues",
            "direct",
            "_disable_io_uring",
        ],
    )?;
    let mut path = None;
    let mut iommu = false;
    let mut readonly = false;
    let mut delay_us = 0;
    let mut fail_every = 0;
    let mut stall_at = None;
    let mut id = None;
    let mut queue_size = DEFAULT_QUEUE_SIZE;
    let mut num_queues = 1;
    let mut direct = false;
    let mut disable_io_uring = false;
    for (k, v) in kv {
        match k {
            "id" if v.is_empty() || v.contains(char::is_whitespace) => {
                return Err(invalid("disk", format!("id={v:?}: a name without spaces")))
            }
            "id" => id = Some(v.to_string()),
            "direct" => direct = parse_on_off("disk", k, v)?,
            "_disable_io_uring" => disable_io_uring = parse_on_off("disk", k, v)?,
            "stall_at" => {
                stall_at = Some(v.parse::<u64>().map_err(|_| {
                    invalid("disk", format!("stall_at={v:?}: expected a sector number"))
                })?);
            }
            "num_queues" => {
                num_queues = v
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (1..=16).contains(n))
                    .ok_or_else(|| invalid("disk", format!("num_queues={v:?}: 1 to 16")))?;
            }
            "queue_size" => {
                queue_size = v
                    .parse::<u16>()
                    .ok()
                    .filter(|n| n.is_power_of_two() && (2..=1024).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            "disk",
                            format!("queue_size={v:?}: a power of two from 2 to 1024"),
                        )
                    })?;
            }
            "path" if v.is_empty() => return Err(invalid("disk", "path= is empty")),
            "path" => path = Some(PathBuf::from(v)),
            "iommu" => iommu = parse_on_off("disk", k, v)?,
            "readonly" => readonly = parse_on_off("disk", k, v)?,
            "delay_us" | "fail_every" => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| invalid("disk", format!("{k}={v:?}: expected a number")))?;
                if k == "delay_us" {
                    if n > 10_000_000 {
                        return Err(invalid("disk", format!("{k}={n}: at most 10000000")));
                    }
                    delay_us = n;
                } else {
                    fail_every = n;
                }
            }
            "image_type" if v == "raw" => {}
            "image_type" => {
                return Err(invalid(
                    "disk",
                    format!("image_type={v:?}: only raw is supported"),
                ))
            }
            _ => unreachable!("split_kv checked the key"),
        }
    }
    let path = path.ok_or_else(|| invalid("disk", format!("{s:?}: path=... is required")))?;
    Ok(DiskConfig {
        path,
        iommu,
        readonly,
        delay_us,
        fail_every,
        stall_at,
        id,
        queue_size,
        num_queues,
        direct,
        disable_io_uring,
    })
}

/// Parses `--platform` (Cloud Hypervisor's names; this VMM has one PCI
/// segment).
pub fn parse_platform(s: &str) -> Result<PlatformConfig, ConfigError> {
    let mut p = PlatformConfig::default();
    // Lists are written [a,b]: split on commas outside brackets.
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    let known = ["iommu_segments", "iommu_address_width", "iommu_fence_ms"];
    let mut seen = Vec::new();
    for part in parts {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if !known.contains(&k) {
            return Err(invalid(
                "platform",
                format!("unknown option {k:?} (known: {})", known.join(", ")),
            ));
        }
        if seen.contains(&k) {
            return Err(invalid("platform", format!("option {k:?} given twice")));
        }
        seen.push(k);
        match k {
            "iommu_segments" => {
                let list = v.trim_start_matches('[').trim_end_matches(']');
                for seg in list.split(',') {
                    match seg.trim().parse::<u16>() {
                        Ok(0) => p.iommu_segment0 = true,
                        Ok(n) => {
                            return Err(invalid(
                                "platform",
                                format!("iommu_segments: segment {n} does not exist (only 0)"),
                            ))
                        }
                        Err(_) => {
                            return Err(invalid(
                                "platform",
                                format!("iommu_segments={v:?}: expected e.g. [0]"),
                            ))
                        }
                    }
                }
            }
            "iommu_fence_ms" => {
                let ms = v
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n <= 600_000)
                    .ok_or_else(|| {
                        invalid("platform", format!("iommu_fence_ms={v:?}: 0..=600000"))
                    })?;
                p.iommu_fence_ms = Some(ms);
            }
            _ => {
                p.iommu_address_width = v
                    .parse::<u8>()
                    .ok()
                    .filter(|n| (1..=64).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            "platform",
                            format!("iommu_address_width={v:?}: from 1 to 64"),
                        )
                    })?;
            }
        }
    }
    Ok(p)
}

/// Parses `--iommu`.
pub fn parse_iommu(s: &str) -> Result<IommuOptions, ConfigError> {
    let mut o = IommuOptions::default();
    for (k, v) in split_kv(
        "iommu",
        s,
        &[
            "poll_us",
            "idle_poll",
            "inline_first",
            "drain",
            "fence_ms",
            "_fence_hold",
        ],
    )? {
        match k {
            "poll_us" => {
                let us: u64 = v
                    .parse()
                    .ok()
                    .filter(|&n| n <= 1_000_000)
                    .ok_or_else(|| invalid("iommu", format!("poll_us={v:?}: 0..=1000000")))?;
                o.poll = std::time::Duration::from_micros(us);
            }
            "idle_poll" => o.idle_poll = parse_on_off("iommu", k, v)?,
            "inline_first" => o.inline_first = parse_on_off("iommu", k, v)?,
            "drain" => o.drain = parse_on_off("iommu", k, v)?,
            "fence_ms" => {
                let ms: u64 = v
                    .parse()
                    .ok()
                    .filter(|&n| n <= 600_000)
                    .ok_or_else(|| invalid("iommu", format!("fence_ms={v:?}: 0..=600000")))?;
                o.fence_after = Some(std::time::Duration::from_millis(ms));
            }
            "_fence_hold" => o.fence_hold = parse_on_off("iommu", k, v)?,
            _ => unreachable!("split_kv checked the key"),
        }
    }
    Ok(o)
}

/// Parses `--serial`.
pub fn parse_serial(s: &str) -> Result<SerialMode, ConfigError> {
    match s {
        "tty" => Ok(SerialMode::Tty),
        "null" => Ok(SerialMode::Null),
        "off" => Ok(SerialMode::Off),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(invalid(
                "serial",
                format!("{s:?}: expected tty, file=PATH, null or off"),
            )),
        },
    }
}

fn check_file(opt: &'static str, p: &Path) -> Result<(), ConfigError> {
    match std::fs::File::open(p).and_then(|f| f.metadata()) {
        Ok(m) if !m.is_dir() => Ok(()),
        _ => Err(ConfigError::MissingFile {
            opt,
            path: p.to_path_buf(),
        }),
    }
}

impl VmConfig {
    /// Validates option values without touching the file system.
    pub fn parse(args: &Args) -> Result<Self, ConfigError> {
        if args.console != "off" {
            return Err(invalid(
                "console",
                format!(
                    "{:?}: only off is supported (no virtio-console)",
                    args.console
                ),
            ));
        }
        if args.cmdline.contains('\0') {
            return Err(invalid("cmdline", "contains a NUL byte"));
        }
        let memory = parse_memory(&args.memory)?;
        let mut iommu = parse_iommu(&args.iommu)?;
        let platform = args
            .platform
            .as_deref()
            .map(parse_platform)
            .transpose()?
            .unwrap_or_default();
        // Cloud Hypervisor's name for `--iommu fence_ms=`.
        if let Some(ms) = platform.iommu_fence_ms {
            if iommu.fence_after.is_some() {
                return Err(invalid(
                    "platform",
                    "iommu_fence_ms and --iommu fence_ms both given: keep one",
                ));
            }
            iommu.fence_after = Some(std::time::Duration::from_millis(ms));
        }
        Ok(VmConfig {
            kernel: args.kernel.clone(),
            initramfs: args.initramfs.clone(),
            cmdline: args.cmdline.clone(),
            cpus: parse_cpus(&args.cpus)?,
            mem_size: memory.size,
            mem_prefault: memory.prefault,
            mem_shared: memory.shared,
            disks: args
                .disk
                .iter()
                .map(|d| {
                    parse_disk(d).map(|mut d| {
                        // A segment behind the IOMMU takes all its devices.
                        d.iommu |= platform.iommu_segment0;
                        d
                    })
                })
                .collect::<Result<_, _>>()?,
            devices: args
                .device
                .iter()
                .map(|d| {
                    parse_device(d).map(|mut d| {
                        d.iommu |= platform.iommu_segment0;
                        d
                    })
                })
                .collect::<Result<_, _>>()?,
            serial: parse_serial(&args.serial)?,
            iommu,
            platform,
        })
    }

    /// Checks that every input file exists and can be opened.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        check_file("kernel", &self.kernel)?;
        if let Some(i) = &self.initramfs {
            check_file("initramfs", i)?;
        }
        for d in &self.disks {
            check_file("disk", &d.path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut v = vec!["vmm", "--kernel", "/k"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v)
    }

    fn cfg(extra: &[&str]) -> Result<VmConfig, ConfigError> {
        VmConfig::parse(&args(extra).expect("clap"))
    }

    #[test]
    fn device_values() {
        let d = parse_device("path=/sys/bus/pci/devices/0000:00:10.0,iommu=on,id=nic0").unwrap();
        assert_eq!(
            d,
            DeviceConfig {
                path: "/sys/bus/pci/devices/0000:00:10.0".into(),
                iommu: true,
                id: Some("nic0".into()),
                skip_container_unmap: false,
            }
        );
        assert!(!parse_device("path=/x").unwrap().iommu);
        assert!(
            parse_device("path=/x,_skip_container_unmap=on")
                .unwrap()
                .skip_container_unmap
        );
        for bad in [
            "",
            "iommu=on",
            "path=",
            "path=/x,iommu=maybe",
            "path=/x,id=",
            "path=/x,bar=1",
        ] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
        let c = cfg(&["--device", "path=/x", "--platform", "iommu_segments=[0]"]).unwrap();
        assert!(c.devices[0].iommu);
    }

    #[test]
    fn disk_id_and_queue_size() {
        let d = parse_disk("path=/a,id=disk0,queue_size=128,num_queues=4").unwrap();
        assert_eq!((d.id.as_deref(), d.queue_size), (Some("disk0"), 128));
        assert_eq!(d.num_queues, 4);
        assert!(parse_disk("path=/a,direct=on").unwrap().direct);
        assert!(parse_disk("path=/a,direct=yes").is_err());
        assert!(
            parse_disk("path=/a,_disable_io_uring=on")
                .unwrap()
                .disable_io_uring
        );
        assert!(!parse_disk("path=/a").unwrap().disable_io_uring);
        assert!(parse_disk("path=/a,num_queues=0").is_err());
        assert!(parse_disk("path=/a,num_queues=17").is_err());
        assert_eq!(
            parse_disk("path=/a").unwrap().queue_size,
            DEFAULT_QUEUE_SIZE
        );
        for bad in [
            "path=/a,queue_size=100",
            "path=/a,queue_size=2048",
            "path=/a,queue_size=0",
            "path=/a,id=",
            "path=/a,id=a b",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn platform_segments_and_address_width() {
        let p = parse_platform("iommu_segments=[0],iommu_address_width=48").unwrap();
        assert!(p.iommu_segment0);
        assert_eq!(p.iommu_address_width, 48);
        assert!(parse_platform("iommu_segments=0").unwrap().iommu_segment0);
        for bad in [
            "iommu_segments=[1]",
            "iommu_segments=[0,1]",
            "iommu_address_width=0",
            "iommu_address_width=65",
            "num_pci_segments=2",
        ] {
            assert!(parse_platform(bad).is_err(), "{bad}");
        }
        // A segment behind the IOMMU puts every disk behind it.
        let c = cfg(&["--disk", "path=/a", "--platform", "iommu_segments=[0]"]).unwrap();
        assert!(c.disks[0].iommu);
    }

    #[test]
    fn platform_iommu_fence_ms_is_cloud_hypervisors_name_for_fence_ms() {
        let c = cfg(&["--platform", "iommu_fence_ms=200"]).unwrap();
        assert_eq!(
            c.iommu.fence_after,
            Some(std::time::Duration::from_millis(200))
        );
        for bad in [
            "iommu_fence_ms=-1",
            "iommu_fence_ms=600001",
            "iommu_fence_ms=",
        ] {
            assert!(parse_platform(bad).is_err(), "{bad}");
        }
        let both = cfg(&[
            "--platform",
            "iommu_fence_ms=200",
            "--iommu",
            "fence_ms=100",
        ]);
        assert!(both.unwrap_err().to_string().contains("keep one"));
    }

    #[test]
    fn defaults() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.cpus, 1);
        assert_eq!(c.mem_size, 512 << 20);
        assert_eq!(c.serial, SerialMode::Tty);
        assert!(c.disks.is_empty());
        assert!(c.initramfs.is_none());
    }

    #[test]
    fn bed_command_line() {
        let c = cfg(&[
            "--initramfs",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "boot=2",
            "--memory",
            "size=1G",
            "--disk",
            "path=/a,iommu=on,image_type=raw",
            "path=/b,iommu=off,readonly=on,image_type=raw",
            "--serial",
            "tty",
            "--console",
            "off",
        ])
        .unwrap();
        assert_eq!(c.cpus, 2);
        assert_eq!(c.mem_size, 1 << 30);
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        assert_eq!(
            c.disks,
            vec![
                DiskConfig {
                    path: "/a".into(),
                    iommu: true,
                    ..Default::default()
                },
                DiskConfig {
                    path: "/b".into(),
                    readonly: true,
                    ..Default::default()
                },
            ]
        );
    }

    #[test]
    fn repeated_disk_flag() {
        let c = cfg(&["--disk", "path=/a", "--disk", "path=/b"]).unwrap();
        assert_eq!(c.disks.len(), 2);
        assert!(!c.disks[0].iommu && !c.disks[0].readonly);
    }

    #[test]
    fn iommu_poll_window() {
        use std::time::Duration;
        let o = |poll: Duration, idle_poll: bool, drain: bool| {
            Ok(IommuOptions {
                poll,
                idle_poll,
                inline_first: true,
                drain,
                fence_after: None,
                fence_hold: true,
            })
        };
        assert_eq!(parse_iommu("poll_us=0"), o(Duration::ZERO, false, true));
        let us500 = Duration::from_micros(500);
        assert_eq!(parse_iommu("poll_us=500"), o(us500, false, true));
        assert_eq!(
            parse_iommu("poll_us=500,idle_poll=on"),
            o(us500, true, true)
        );
        assert_eq!(
            parse_iommu("drain=off"),
            o(crate::config::DEFAULT_POLL, false, false)
        );
        assert!(!parse_iommu("inline_first=off").unwrap().inline_first);
        assert!(parse_iommu("drain=no").is_err());
        assert!(parse_iommu("idle_poll=maybe").is_err());
        assert!(parse_iommu("poll_us=-1").is_err());
        assert!(parse_iommu("poll_us=2000000").is_err());
        assert!(parse_iommu("spin=1").is_err());
        assert_eq!(
            parse_iommu("fence_ms=250").unwrap().fence_after,
            Some(Duration::from_millis(250))
        );
        assert!(parse_iommu("fence_ms=-1").is_err());
        assert!(parse_iommu("fence_ms=700000").is_err());
    }

    #[test]
    fn fault_injection_keys() {
        let d = parse_disk("path=/a,iommu=on,delay_us=20000,fail_every=7").unwrap();
        assert_eq!((d.delay_us, d.fail_every), (20000, 7));
        assert_eq!(
            parse_disk("path=/a,stall_at=65536").unwrap().stall_at,
            Some(65536)
        );
        assert!(parse_disk("path=/a,stall_at=x").is_err());
        assert!(parse_disk("path=/a,delay_us=x").is_err());
        assert!(parse_disk("path=/a,delay_us=10000001").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("65536K"), Some(64 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }

    #[test]
    fn bad_memory() {
        for m in [
            "size=",
            "size=12X",
            "size=1M",
            "size=1000G",
            "foo=1G",
            "512M",
            "size=33554433",
        ] {
            assert!(parse_memory(m).is_err(), "{m}");
        }
        assert!(parse_memory("size=1G,prefault=maybe").is_err());
        assert!(parse_memory("prefault=on").is_err(), "size is required");
        let m = parse_memory("size=3584M").unwrap();
        assert_eq!((m.size, m.prefault), (3584 << 20, false));
        let m = parse_memory("size=1G,prefault=on").unwrap();
        assert_eq!((m.size, m.prefault), (1 << 30, true));
    }

    #[test]
    fn bad_cpus() {
        for c in [
            "boot=0",
            "boot=x",
            "boot=",
            "max=2",
            "boot=1,boot=2",
            "boot=255",
        ] {
            assert!(parse_cpus(c).is_err(), "{c}");
        }
        assert_eq!(parse_cpus("boot=4").unwrap(), 4);
    }

    #[test]
    fn bad_disks() {
        for d in [
            "iommu=on",
            "path=",
            "path=/a,iommu=yes",
            "path=/a,image_type=qcow2",
            "path=/a,direct=maybe",
            "path=/a,vhost_user=on",
            "path=/a,,iommu=on",
            "path=/a,path=/b",
            "path=/a,readonly=1",
        ] {
            assert!(parse_disk(d).is_err(), "{d}");
        }
        let e = parse_disk("path=/a,image_type=qcow2")
            .unwrap_err()
            .to_string();
        assert!(e.contains("only raw"), "{e}");
    }

    #[test]
    fn serial_and_console() {
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialMode::File("/tmp/x".into())
        );
        assert_eq!(parse_serial("off").unwrap(), SerialMode::Off);
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("pty").is_err());
        assert!(cfg(&["--console", "tty"]).is_err());
    }

    #[test]
    fn clap_rejects() {
        assert!(Args::try_parse_from(["vmm"]).is_err(), "kernel required");
        assert!(args(&["--bogus"]).is_err());
        assert!(args(&["--disk"]).is_err());
        // clap's own usage errors exit with status 2.
        assert_eq!(args(&["--bogus"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn missing_files_are_named() {
        let c = cfg(&["--initramfs", "/nonexistent/initrd"]).unwrap();
        let mut c2 = c.clone();
        c2.kernel = std::env::current_exe().unwrap();
        let e = c2.check_files().unwrap_err();
        assert_eq!(
            e,
            ConfigError::MissingFile {
                opt: "initramfs",
                path: "/nonexistent/initrd".into()
            }
        );
        assert!(e.to_string().contains("/nonexistent/initrd"));
        assert!(c.check_files().is_err());
    }
}
