//! Test disks: each image carries a label in sector 0
//! (`VIOMMU-TESTDISK id=<id> iommu=<on|off>`), written by the harness, so the
//! agent knows which disk is which regardless of enumeration order.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::Res;

pub const LABEL_MAGIC: &str = "VIOMMU-TESTDISK";
/// Scenarios never touch the first MiB of a disk (it holds the label).
pub const RESERVED_BYTES: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct Disk {
    /// Kernel name, e.g. `vda`.
    pub name: String,
    /// Label id, e.g. `d0` or `slow`.
    pub id: String,
    /// What the label says the VMM was told (`iommu=on`).
    pub iommu_on: bool,
    /// PCI address of the virtio-blk function.
    pub bdf: String,
    /// Size in bytes.
    pub size: u64,
}

fn block_names() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/sys/block")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vd"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

impl Disk {
    /// Opens the whole device for reading and writing with O_DIRECT, so
    /// that every access reaches the virtio-blk device.
    pub fn open_direct(&self) -> Res<fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(format!("/dev/{}", self.name))
            .map_err(|e| format!("open /dev/{} O_DIRECT: {e}", self.name))
    }
}

/// PCI address of the device behind a block device.
pub fn pci_of_block(name: &str) -> Res<String> {
    let p = fs::canonicalize(format!("/sys/block/{name}/device"))
        .map_err(|e| format!("resolve /sys/block/{name}/device: {e}"))?;
    let parent = p
        .parent()
        .and_then(|q| q.file_name())
        .map(|s| s.to_string_lossy().into_owned())
        .ok_or_else(|| format!("no PCI parent for {}", p.display()))?;
    Ok(parent)
}

fn read_label(name: &str) -> Res<Option<(String, bool)>> {
    let mut f =
        fs::File::open(format!("/dev/{name}")).map_err(|e| format!("open /dev/{name}: {e}"))?;
    let mut buf = [0u8; 512];
    f.read_exact(&mut buf)
        .map_err(|e| format!("read label of /dev/{name}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let line = text.lines().next().unwrap_or("");
    if !line.starts_with(LABEL_MAGIC) {
        return Ok(None);
    }
    let mut id = None;
    let mut on = None;
    for w in line.split_whitespace().skip(1) {
        match w.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("iommu", v)) => on = Some(v == "on"),
            _ => {}
        }
    }
    match (id, on) {
        (Some(i), Some(o)) => Ok(Some((i, o))),
        _ => Err(format!("malformed label on /dev/{name}: {line:?}")),
    }
}

/// Waits until `expected` virtio disks are present (0: whatever shows up
/// within a short settle time), then reads their labels.
pub fn discover(expected: usize) -> Res<Vec<Disk>> {
    let t = Instant::now();
    let limit = Duration::from_secs(20);
    loop {
        let n = block_names().len();
        if (expected > 0 && n >= expected)
            || (expected == 0 && t.elapsed() > Duration::from_secs(2))
        {
            break;
        }
        if t.elapsed() > limit {
            return Err(format!(
                "only {n} of {expected} virtio disks appeared within {limit:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = Vec::new();
    for name in block_names() {
        // A disk with injected failures (`fail_every`) may fail one read:
        // the next one does not fail.
        let label = read_label(&name).or_else(|_| {
            std::thread::sleep(Duration::from_millis(50));
            read_label(&name)
        });
        let Some((id, iommu_on)) = label? else {
            continue;
        };
        let sectors: u64 = fs::read_to_string(format!("/sys/block/{name}/size"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        out.push(Disk {
            bdf: pci_of_block(&name)?,
            name,
            id,
            iommu_on,
            size: sectors * 512,
        });
    }
    Ok(out)
}

/// Picks a labelled disk by id, or else the first disk with the wanted
/// IOMMU setting.
pub fn pick(disks: &[Disk], id: Option<&str>, iommu_on: bool) -> Res<Disk> {
    if let Some(id) = id {
        return disks
            .iter()
            .find(|d| d.id == id)
            .cloned()
            .ok_or_else(|| format!("no disk labelled id={id}"));
    }
    disks
        .iter()
        .find(|d| d.iommu_on == iommu_on)
        .cloned()
        .ok_or_else(|| format!("no disk with iommu={}", if iommu_on { "on" } else { "off" }))
}

/// The IOMMU group type of a PCI device, `None` when it has no group.
pub fn group_type(bdf: &str) -> Option<String> {
    let g = format!("/sys/bus/pci/devices/{bdf}/iommu_group");
    if !Path::new(&g).exists() {
        return None;
    }
    Some(
        fs::read_to_string(format!("{g}/type"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
    )
}
