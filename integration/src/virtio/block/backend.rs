//! The disk behind a virtio-blk device: a raw image file or block device,
//! and the execution of parsed requests against it with blocking
//! `preadv`, `pwritev` and `fdatasync` straight into (pinned) guest
//! memory, or through O_DIRECT with `direct=on` (`direct.rs`). Fault
//! injection for tests (`delay_us`, `fail_every`, `stall_at`) lives here
//! too.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use super::direct::Direct;
use super::host_io::{copy_into_bufs, rw};
use super::request::{
    Geometry, Kind, Request, SECTOR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use crate::config::DiskConfig;

/// How long `stall_at` holds a request: for ever, as far as a test can
/// tell (only a cancellation ends it).
const STALL: Duration = Duration::from_secs(24 * 3600);

/// Length of the GET_ID string.
pub const ID_LEN: usize = 20;

/// The image and settings that do not change while the device runs, and
/// the counters the device and its stall report share.
pub struct Backend {
    /// `id=`, or the image's file name (also the GET_ID string).
    pub name: String,
    file: File,
    /// The O_DIRECT side of the image (`direct=on`).
    direct: Option<Direct>,
    /// Capacity in bytes (whole sectors).
    pub capacity: u64,
    /// Writes are refused.
    pub readonly: bool,
    id: [u8; ID_LEN],
    delay: Duration,
    fail_every: u64,
    stall_at: Option<u64>,
    requests: AtomicU64,
    /// Used-ring writes that failed (ring unmapped by the guest).
    pub ring_errors: AtomicU64,
    /// Chains returned unused because they could not be parsed.
    pub parse_errors: AtomicU64,
    /// Requests handed to the workers and not yet completed.
    pub in_flight: AtomicU64,
    /// Whether the last completion asked for an interrupt (stall report).
    pub last_signalled: AtomicBool,
    /// Interrupts sent for completions.
    pub interrupts: AtomicU64,
    /// Requests completed with VIRTIO_BLK_S_IOERR.
    pub io_errors: AtomicU64,
    /// Requests cancelled by their pins' revoke hook.
    pub cancelled: AtomicU64,
    /// How the last activation ran its I/O ([`Engine`]).
    pub engine: std::sync::atomic::AtomicU8,
}

/// What runs a disk's I/O, as the exit report names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Engine {
    /// Not activated yet.
    None = 0,
    /// One io_uring per queue.
    IoUring = 1,
    /// Worker threads.
    Workers = 2,
}

impl Backend {
    /// Opens `cfg.path` (a raw image file or a block device) and locks it,
    /// exclusively unless read-only (as Cloud Hypervisor does), so that two
    /// VMs never write one image: a second open fails with a clear error.
    pub fn open(cfg: &DiskConfig) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .open(&cfg.path)?;
        lock(&file, cfg)?;
        let len = size_of(&file)?;
        let direct = if cfg.direct {
            Some(Direct::open(cfg)?)
        } else {
            None
        };
        let mut id = [0u8; ID_LEN];
        let name = cfg.id.clone().unwrap_or_else(|| {
            cfg.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let n = name.len().min(ID_LEN);
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(Backend {
            name,
            file,
            direct,
            capacity: len / SECTOR * SECTOR,
            readonly: cfg.readonly,
            id,
            delay: Duration::from_micros(cfg.delay_us),
            fail_every: cfg.fail_every,
            stall_at: cfg.stall_at,
            requests: AtomicU64::new(0),
            ring_errors: AtomicU64::new(0),
            parse_errors: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            last_signalled: AtomicBool::new(false),
            interrupts: AtomicU64::new(0),
            io_errors: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            engine: std::sync::atomic::AtomicU8::new(Engine::None as u8),
        })
    }

    /// One line for the VMM's exit report.
    pub fn report(&self) -> String {
        let name = &self.name;
        let engine = match self.engine.load(Ordering::Relaxed) {
            1 => "io_uring",
            2 => "workers",
            _ => "none",
        };
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "virtio-blk {name}: engine={engine} requests={} ioerr={} cancelled={} \
             parse_errors={} ring_errors={} in_flight={}",
            n(&self.requests),
            n(&self.io_errors),
            n(&self.cancelled),
            n(&self.parse_errors),
            n(&self.ring_errors),
            n(&self.in_flight),
        )
    }

    /// What request parsing needs to know.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            capacity: self.capacity,
            readonly: self.readonly,
        }
    }

    /// Counts a request that reached the backend; returns whether fault
    /// injection (`fail_every`) fails it.
    pub fn admit(&self) -> bool {
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        self.fail_every > 0 && n.is_multiple_of(self.fail_every)
    }

    /// Runs `req`'s I/O (after the injected delay, unless cancelled);
    /// returns the status byte and the bytes written into the guest.
    pub fn execute(&self, req: &Request) -> (u8, u64) {
        let fail = self.admit();
        self.execute_admitted(req, fail)
    }

    /// How long fault injection holds `req` before its I/O: the
    /// `delay_us`, or, for a read or write covering `stall_at`, until it
    /// is cancelled.
    fn delay_of(&self, req: &Request) -> Duration {
        let covers = |s: u64| {
            matches!(req.kind, Kind::In | Kind::Out)
                && s >= req.sector
                && s - req.sector < req.data_len / SECTOR
        };
        if self.stall_at.is_some_and(covers) {
            STALL
        } else {
            self.delay
        }
    }

    /// [`Backend::execute`] for a request already counted by
    /// [`Backend::admit`], which said `fail`.
    pub fn execute_admitted(&self, req: &Request, fail: bool) -> (u8, u64) {
        if let Some(s) = req.early_status {
            return (s, 0);
        }
        let delay = self.delay_of(req);
        if !delay.is_zero() {
            req.cancel.sleep(delay);
        }
        if req.cancel.is_cancelled() || fail {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        // The parser checked that the range is inside the disk.
        let offset = req.sector * SECTOR;
        match req.kind {
            Kind::In => match self.transfer(req, offset, false) {
                Ok(()) => (VIRTIO_BLK_S_OK, req.data_len),
                Err(e) => {
                    log::warn!("virtio-blk: read at sector {}: {e}", req.sector);
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            Kind::Out => match self.transfer(req, offset, true) {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    log::warn!("virtio-blk: write at sector {}: {e}", req.sector);
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            Kind::Flush => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(_) => (VIRTIO_BLK_S_IOERR, 0),
            },
            // Written in the pins' write sections (`Request::write_sections`).
            Kind::GetId => match req.write_sections(|| copy_into_bufs(&req.data, 0, &self.id)) {
                Some(n) => (VIRTIO_BLK_S_OK, n as u64),
                None => (VIRTIO_BLK_S_IOERR, 0),
            },
            Kind::Unsupported => (VIRTIO_BLK_S_UNSUPP, 0),
        }
    }
}

/// How io_uring runs a request (`uring.rs`).
#[derive(Debug, PartialEq, Eq)]
pub enum UringPlan {
    /// Nothing to submit: the status byte and the bytes written into the
    /// guest are known.
    Done(u8, u64),
    /// Not for io_uring (GET_ID, an unsupported type, an O_DIRECT request
    /// whose guest buffers need a bounce buffer): run it with
    /// [`Backend::execute_admitted`] on the queue thread.
    Blocking,
    /// Submit `op` on `fd`, after the injected delay when there is one;
    /// `fail` (fault injection) completes the request with IOERR instead
    /// of doing the I/O.
    Submit {
        /// The injected delay (zero: none).
        delay: Duration,
        /// Fail instead of doing the I/O.
        fail: bool,
        /// What to do.
        op: UringOp,
        /// On which file descriptor.
        fd: std::os::fd::RawFd,
    },
}

/// The operations the io_uring path submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UringOp {
    /// `readv` into the request's buffers.
    Read,
    /// `writev` from them.
    Write,
    /// `fdatasync`.
    Flush,
}

impl Backend {
    /// Counts `req` (as [`Backend::admit`]) and says how io_uring runs it.
    pub fn uring_plan(&self, req: &Request) -> (UringPlan, bool) {
        let fail = self.admit();
        if let Some(s) = req.early_status {
            return (UringPlan::Done(s, 0), fail);
        }
        let (op, fd) = match req.kind {
            Kind::In | Kind::Out => {
                let write = req.kind == Kind::Out;
                let op = if write { UringOp::Write } else { UringOp::Read };
                let fd = match &self.direct {
                    None => Some(self.file.as_raw_fd()),
                    Some(d) => d.fd_for(&self.file, &req.data, req.sector * SECTOR, write),
                };
                match fd {
                    Some(fd) => (op, fd),
                    None => return (UringPlan::Blocking, fail),
                }
            }
            Kind::Flush => (UringOp::Flush, self.file.as_raw_fd()),
            Kind::GetId | Kind::Unsupported => return (UringPlan::Blocking, fail),
        };
        let delay = self.delay_of(req);
        if fail && delay.is_zero() {
            return (UringPlan::Done(VIRTIO_BLK_S_IOERR, 0), fail);
        }
        let plan = UringPlan::Submit {
            delay,
            fail,
            op,
            fd,
        };
        (plan, fail)
    }

    /// Reads (`write == false`) or writes the whole of `req`'s data at
    /// `offset`, directly when the disk is `direct=on` (a read copied from
    /// a bounce buffer is copied in the pins' write sections).
    fn transfer(&self, req: &Request, offset: u64, write: bool) -> std::io::Result<()> {
        let bufs = &req.data;
        match &self.direct {
            Some(d) => d.transfer(&self.file, bufs, offset, write, &|pos, part| {
                req.write_sections(|| copy_into_bufs(bufs, pos, part))
                    .is_some()
            }),
            None => rw(&self.file, bufs, offset, write),
        }
    }
}

/// Locks the image for this VMM: shared for a read-only disk, exclusive
/// otherwise, never waiting.
fn lock(file: &File, cfg: &DiskConfig) -> std::io::Result<()> {
    let how = if cfg.readonly {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a file descriptor this function borrows; no memory
    // is passed.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ResourceBusy,
            format!(
                "{} is in use (locked by another VM or by this one: each image may be \
                 given once, or several times only read-only)",
                cfg.path.display()
            ),
        ));
    }
    Err(e)
}

/// Size in bytes of an image file or a block device.
fn size_of(file: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    // BLKGETSIZE64 = _IOR(0x12, 114, size_t).
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
    // points to a live, exclusively borrowed u64.
    if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_is_locked_while_open() {
        let path = std::env::temp_dir().join(format!("vmm-lock-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let rw = DiskConfig {
            path: path.clone(),
            ..Default::default()
        };
        let ro = DiskConfig {
            readonly: true,
            ..rw.clone()
        };
        let first = Backend::open(&rw).unwrap();
        let e = Backend::open(&rw)
            .err()
            .expect("a second writer is refused");
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(Backend::open(&ro).is_err(), "no reader next to a writer");
        drop(first);
        let a = Backend::open(&ro).unwrap();
        let b = Backend::open(&ro).unwrap();
        assert_eq!((a.capacity, b.capacity), (4096, 4096));
        std::fs::remove_file(&path).unwrap();
    }
}
