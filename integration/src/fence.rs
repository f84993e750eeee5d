//! Fencing guest pages: taking them from DMA the host cannot cancel.
//!
//! When an invalidation is still held by DMA after the revocation grace and
//! the fence delay (`--iommu fence_ms=`), the IOMMU's device thread gets a
//! `virtio_iommu::Fence` from the crate: the guest-physical pages of the
//! pins still in flight. [`PageFencer::fence`] replaces each such page of
//! guest RAM with a fresh page holding the same bytes, with every
//! vCPU held outside `KVM_RUN` ([`crate::vcpu_hold`]):
//!
//! 1. hold the vCPUs;
//! 2. copy the pages' bytes aside;
//! 3. drop them from private RAM (`madvise(MADV_DONTNEED)`), or for shared
//!    RAM punch them out of its memfd (KVM's MMU notifier drops its
//!    mappings of the old pages; the next access faults fresh ones in);
//! 4. write the bytes back into the fresh pages, let the vCPUs go.
//!
//! The old pages stay allocated while the kernel holds them for the I/O
//! (`O_DIRECT` pins the pages when the request is issued) and the late DMA
//! lands there, where neither the guest nor the VMM's address space can
//! see it; the kernel frees them when the I/O ends. The crate then lets
//! the invalidation reply.
//!
//! # What makes it sound, and what the VMM refuses
//!
//! - The DMA must target the pages pinned when the I/O was issued, not the
//!   guest's address space at completion: every `iommu=on` disk must use
//!   `direct=on` (a buffered read is copied into the VMM's address space
//!   when it completes, which would then be the fresh page). A fenced pin
//!   was revoked at the grace deadline and its cancellation failed, so its
//!   I/O is running (issued, its pages pinned), not queued.
//! - No VMM thread may write the pages during the copy: the vCPUs are
//!   held, the IOMMU's own queues are served by the thread that fences (or
//!   by a held vCPU), and the crate revokes and refuses every other pin on
//!   the pages while the fence runs. A block request writes its status
//!   byte and any data it copies (a bounce buffer) inside its pins' write
//!   sections (`Pin::write_section`), which the crate's fence waits for
//!   before it claims or marks the pins, and which do not open after: a
//!   request whose pin was fenced writes neither data nor status byte
//!   through it.
//!   Not covered: a ring of a block queue placed in the same page as a
//!   fenced buffer (a guest that does that loses its own ring writes).
//! - A VFIO container would keep mapping the old pages, and a disk outside
//!   the IOMMU holds no pin the crate could revoke (its DMA into a page
//!   shared with a fenced buffer would land in the old page with a success
//!   status): fencing is refused with any passed-through device and with
//!   any `iommu=off` disk (`devices::check_fenceable`).
//! - Guest RAM is private anonymous memory or a memfd mapped shared
//!   (`--memory shared=on`), in 4 KiB pages: this VMM has no
//!   hugepage-backed RAM to refuse. Shared RAM is fenced by punching the
//!   pages out of the memfd and writing the bytes back (fresh pages);
//!   another process mapping that memfd (vhost-user) would see the fresh
//!   pages too, but its own DMA pins are not the crate's to fence.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_iommu::fence::FENCE_PAGE_SIZE;
use virtio_iommu::GpaRange;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::vcpu_hold::VcpuHold;

/// How long a fence waits for the vCPUs to stop before it gives up (a vCPU
/// blocked in an exit handler); the invalidation then waits for the DMA.
const HOLD_TIMEOUT: Duration = Duration::from_secs(1);

/// The unsafe control's wait between copying and replacing a range.
pub const UNHELD_GAP: Duration = Duration::from_millis(20);

/// What one fence did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced {
    /// Pages replaced.
    pub pages: u64,
    /// How long the vCPUs took to stop.
    pub stop: Duration,
    /// How long they were held (stopping included).
    pub held: Duration,
}

/// Replaces guest pages under uncancellable DMA; see the
/// [module documentation](self).
pub struct PageFencer {
    mem: GuestMemoryMmap,
    hold: Arc<VcpuHold>,
    /// Test control, UNSAFE: replace pages with the vCPUs running (a
    /// guest write between the copy and the remap is lost).
    unheld: bool,
}

/// One range to replace, resolved to the host.
struct Target {
    host: *mut u8,
    len: usize,
    /// Shared RAM: the memfd and the range's offset in it.
    file: Option<(RawFd, i64)>,
}

impl PageFencer {
    /// A fencer of `mem`'s pages that holds the vCPUs registered with
    /// `hold`.
    pub fn new(mem: GuestMemoryMmap, hold: Arc<VcpuHold>) -> Self {
        PageFencer {
            mem,
            hold,
            unheld: false,
        }
    }

    /// UNSAFE test control (`--iommu _fence_hold=off`): fences without
    /// holding the vCPUs, and waits [`UNHELD_GAP`] between copying a range
    /// and replacing it, so that the guest test's concurrent writer shows
    /// the writes such a fence loses whatever the host's scheduling.
    pub fn without_holding_vcpus(mut self) -> Self {
        self.unheld = true;
        self
    }

    /// Replaces the pages of `ranges` (whole pages, from
    /// `virtio_iommu::Fence::ranges`). On error nothing was replaced,
    /// except when the kernel failed a replacement midway (the error says
    /// so).
    pub fn fence(&self, ranges: &[GpaRange]) -> Result<Fenced, String> {
        let targets = ranges
            .iter()
            .map(|r| self.resolve(r))
            .collect::<Result<Vec<_>, _>>()?;
        let longest = targets.iter().map(|t| t.len).max().unwrap_or(0);
        // Allocated before the vCPUs stop: they are held for the copies only.
        let mut scratch = vec![0u8; longest];
        let start = Instant::now();
        let held = if self.unheld {
            None
        } else {
            Some(self.hold.hold(HOLD_TIMEOUT)?)
        };
        let stop = held.as_ref().map_or(Duration::ZERO, |h| h.took());
        for t in &targets {
            // SAFETY: `t` was resolved to whole pages inside one anonymous
            // region of `self.mem`, which stays mapped while `self` lives;
            // the vCPUs are held and no other thread writes these pages
            // (module docs), so nothing sees them between unmap and copy.
            unsafe { replace(t, &mut scratch[..t.len], self.unheld.then_some(UNHELD_GAP)) }?;
        }
        drop(held);
        Ok(Fenced {
            pages: targets.iter().map(|t| t.len as u64).sum::<u64>() / FENCE_PAGE_SIZE,
            stop,
            held: start.elapsed(),
        })
    }

    /// Checks that `r` is whole pages of one anonymous RAM region and
    /// returns where they are mapped.
    fn resolve(&self, r: &GpaRange) -> Result<Target, String> {
        let bad = |why: &str| format!("fence of [{:#x}, +{:#x}): {why}", r.gpa, r.len);
        if r.len == 0
            || !r.gpa.is_multiple_of(FENCE_PAGE_SIZE)
            || !r.len.is_multiple_of(FENCE_PAGE_SIZE)
        {
            return Err(bad("not whole pages"));
        }
        let region = self
            .mem
            .find_region(GuestAddress(r.gpa))
            .ok_or_else(|| bad("not guest RAM"))?;
        let offset = r.gpa - region.start_addr().0;
        if offset
            .checked_add(r.len)
            .is_none_or(|end| end > region.len())
        {
            return Err(bad("crosses the end of a RAM region"));
        }
        let file = match region.file_offset() {
            None => None,
            Some(fo) => {
                let at = fo
                    .start()
                    .checked_add(offset)
                    .and_then(|o| i64::try_from(o).ok())
                    .ok_or_else(|| bad("file offset out of range"))?;
                Some((fo.file().as_raw_fd(), at))
            }
        };
        let host = self
            .mem
            .get_host_address(GuestAddress(r.gpa))
            .map_err(|e| bad(&e.to_string()))?;
        let len = usize::try_from(r.len).map_err(|_| bad("too long"))?;
        Ok(Target { host, len, file })
    }
}

/// Puts fresh pages holding the same bytes in place of
/// `[t.host, t.host + t.len)`, after waiting `gap` between the copy and
/// the replacement (test control only). The range is dropped from private
/// anonymous RAM (`MADV_DONTNEED`) or punched out of shared RAM's memfd,
/// which unmaps the old pages from every mapping (KVM's included, through
/// its MMU notifier) while the kernel's pin keeps them for the I/O; the
/// bytes written back fault fresh pages in.
///
/// # Safety
///
/// The range is whole pages of guest RAM (a private anonymous mapping, or
/// the shared mapping of `t.file`) that nothing else reads or writes
/// during the call.
unsafe fn replace(t: &Target, scratch: &mut [u8], gap: Option<Duration>) -> Result<(), String> {
    // SAFETY: the caller's range is mapped and `scratch` is `t.len` long.
    unsafe { std::ptr::copy_nonoverlapping(t.host, scratch.as_mut_ptr(), t.len) };
    if let Some(gap) = gap {
        std::thread::sleep(gap);
    }
    if let Some((fd, offset)) = t.file {
        // SAFETY: punches whole pages of the guest RAM memfd; its shared
        // mapping stays, and the next access faults fresh pages in.
        let r = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                t.len as i64,
            )
        };
        if r != 0 {
            return Err(format!(
                "punching {} bytes out of the guest RAM memfd: {}",
                t.len,
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: the shared mapping is still at `t.host`, `t.len` long.
        unsafe { std::ptr::copy_nonoverlapping(scratch.as_ptr(), t.host, t.len) };
        return Ok(());
    }
    // Private anonymous RAM: drop the pages from the mapping. The kernel's
    // pin keeps each old page for the I/O; the next access (the copy back
    // below) faults a fresh zeroed page in. Unlike a new mapping over the
    // range, this keeps the mapping whole (no split, nothing against
    // `vm.max_map_count`) with its attributes, and a failure leaves the
    // pages where they were.
    // SAFETY: whole pages of a private anonymous mapping that this VMM
    // owns (guest RAM); the caller's bytes are in `scratch` and are written
    // back before anything else touches the range.
    let r = unsafe { libc::madvise(t.host.cast(), t.len, libc::MADV_DONTNEED) };
    if r != 0 {
        return Err(format!(
            "madvise(MADV_DONTNEED) of {} bytes of guest RAM: {}",
            t.len,
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: the mapping is still at `t.host`, `t.len` long.
    unsafe { std::ptr::copy_nonoverlapping(scratch.as_ptr(), t.host, t.len) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 20), 1 << 20),
        ])
        .unwrap()
    }

    fn range(gpa: u64, len: u64) -> GpaRange {
        GpaRange { gpa, len }
    }

    /// The fresh pages read as the old ones did, and the old pages are no
    /// longer where the guest's RAM is: a reference to them (as the
    /// kernel's pin of an O_DIRECT read holds) sees writes the guest never
    /// sees, and the other way round.
    #[test]
    fn fenced_private_pages_keep_their_bytes_and_part_from_the_old_pages() {
        fenced_pages_keep_their_bytes_and_part_from_the_old_pages(mem());
    }

    #[test]
    fn fenced_shared_pages_keep_their_bytes_and_part_from_the_old_pages() {
        let ranges = [(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)];
        let mem = crate::memory::guest_ram(&ranges, true).unwrap();
        fenced_pages_keep_their_bytes_and_part_from_the_old_pages(mem);
    }

    fn fenced_pages_keep_their_bytes_and_part_from_the_old_pages(mem: GuestMemoryMmap) {
        let pattern: Vec<u8> = (0..3 * 4096).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x4000)).unwrap();
        let host = mem.get_host_address(GuestAddress(0x5000)).unwrap();
        // A second mapping of the old page, as the kernel's pin keeps it:
        // mremap with old_size 0 duplicates a shared mapping only, so use
        // a pipe the kernel holds the page in instead (vmsplice).
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let iov = libc::iovec {
            iov_base: host.cast(),
            iov_len: 4096,
        };
        // SAFETY: splices the page (by reference, SPLICE_F_GIFT not set)
        // into the pipe.
        let n = unsafe { libc::vmsplice(fds[1], &iov, 1, 0) };
        assert_eq!(n, 4096);
        let hold = VcpuHold::new(libc::SIGRTMIN() + 2);
        let fencer = PageFencer::new(mem.clone(), hold);
        let f = fencer.fence(&[range(0x5000, 0x1000)]).unwrap();
        assert_eq!(f.pages, 1);
        let mut now = vec![0u8; 3 * 4096];
        mem.read_slice(&mut now, GuestAddress(0x4000)).unwrap();
        assert_eq!(now, pattern, "the guest's bytes changed");
        // A write by the guest after the fence...
        mem.write_slice(&[0xee; 16], GuestAddress(0x5000)).unwrap();
        // ...is not in the page the pipe (the "DMA") still holds.
        let mut spliced = vec![0u8; 4096];
        // SAFETY: reads into a local buffer.
        let n = unsafe { libc::read(fds[0], spliced.as_mut_ptr().cast(), 4096) };
        assert_eq!(n, 4096);
        assert_eq!(spliced, pattern[4096..8192], "the old page changed");
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
    }

    #[test]
    fn ranges_outside_whole_pages_of_one_region_are_refused() {
        let hold = VcpuHold::new(libc::SIGRTMIN() + 2);
        let fencer = PageFencer::new(mem(), hold);
        for (r, why) in [
            (range(0x5001, 0x1000), "not whole pages"),
            (range(0x5000, 0x800), "not whole pages"),
            (range(0xff000, 0x2000), "crosses the end"),
            (range(4 << 20, 0x1000), "not guest RAM"),
        ] {
            let e = fencer.fence(&[r]).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }
}
