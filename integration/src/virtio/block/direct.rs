//! `direct=on`: the image opened with O_DIRECT, so that disk I/O bypasses
//! the host's page cache. O_DIRECT needs aligned memory, offsets and
//! lengths: a request whose guest buffers are not aligned goes through an
//! aligned bounce buffer (a bounded chunk at a time), and the rare request
//! whose offset or length is not aligned goes through the page cache (the
//! kernel keeps the two coherent).
//!
//! A read lands in guest memory only by O_DIRECT DMA into the pages pinned
//! when it was issued, or by a copy the caller makes in the write sections
//! of the request's pins (`copy_in`, `virtio_iommu::Pin::write_section`):
//! a read the kernel would copy into the VMM's address space at completion
//! (through the page cache) goes through a bounce buffer too. A fence
//! (`crate::fence`) can then divert the first and waits for, or refuses,
//! the second; a kernel copy at completion could land in the guest's new
//! page after the invalidation replied.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};

use super::host_io::{copy_from_bufs, rw};
use super::request::HostBuf;
use crate::config::DiskConfig;

/// The image opened with O_DIRECT, and what O_DIRECT requires of it.
pub struct Direct {
    file: File,
    /// Alignment of memory buffers.
    mem_align: usize,
    /// Alignment of file offsets and lengths.
    off_align: u64,
}

/// How a transfer goes (see `Direct::path`).
enum Path {
    /// Through the page cache: the offset or length is not aligned.
    PageCache,
    /// Straight through O_DIRECT.
    Direct,
    /// Through an aligned bounce buffer: some guest buffer is not aligned.
    Bounce,
}

/// Bytes a bounce buffer carries at a time: bounds what a request can make
/// the VMM allocate, whatever its length.
const BOUNCE_CHUNK: usize = 1 << 20;

impl Direct {
    /// Opens `cfg.path` with O_DIRECT; a file system without it is an
    /// error that says to use `direct=off`.
    pub fn open(cfg: &DiskConfig) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.readonly)
            .custom_flags(libc::O_DIRECT)
            .open(&cfg.path)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "direct=on: {} cannot be opened with O_DIRECT ({e}); its file system \
                         may not support it: use direct=off",
                        cfg.path.display()
                    ),
                )
            })?;
        let (mem_align, off_align) = dio_align(&file);
        Ok(Direct {
            file,
            mem_align,
            off_align,
        })
    }

    /// How a transfer of `bufs` at `offset` can be done: O_DIRECT needs
    /// the offset, the length and every buffer aligned.
    fn path(&self, bufs: &[HostBuf], offset: u64) -> Path {
        let total: usize = bufs.iter().map(|b| b.len).sum();
        if !offset.is_multiple_of(self.off_align) || !(total as u64).is_multiple_of(self.off_align)
        {
            return Path::PageCache;
        }
        let aligned = bufs.iter().all(|b| {
            (b.ptr as usize).is_multiple_of(self.mem_align)
                && (b.len as u64).is_multiple_of(self.off_align)
        });
        if aligned {
            Path::Direct
        } else {
            Path::Bounce
        }
    }

    /// Which descriptor io_uring can run a transfer of `bufs` at `offset`
    /// on: the O_DIRECT one when everything is aligned, `buffered` for a
    /// write whose offset or length is not (as `transfer` does); `None`
    /// when a bounce buffer is needed (`transfer` then does it): guest
    /// buffers that are not aligned, or a read O_DIRECT cannot do.
    pub fn fd_for(
        &self,
        buffered: &File,
        bufs: &[HostBuf],
        offset: u64,
        write: bool,
    ) -> Option<RawFd> {
        match self.path(bufs, offset) {
            Path::PageCache if write => Some(buffered.as_raw_fd()),
            Path::Direct => Some(self.file.as_raw_fd()),
            Path::PageCache | Path::Bounce => None,
        }
    }

    /// Reads (`write == false`) or writes the whole of `bufs` at `offset`;
    /// `buffered` is the same image without O_DIRECT. A read that does not
    /// go straight into `bufs` by O_DIRECT lands in a bounce buffer, and
    /// `copy_in(pos, bytes)` copies each chunk into `bufs` at `pos`; when
    /// it refuses (a fence took the pages), the read fails.
    pub fn transfer(
        &self,
        buffered: &File,
        bufs: &[HostBuf],
        offset: u64,
        write: bool,
        copy_in: &dyn Fn(usize, &[u8]) -> bool,
    ) -> std::io::Result<()> {
        let file = match (self.path(bufs, offset), write) {
            (Path::Direct, _) => return rw(&self.file, bufs, offset, write),
            // O_DIRECT cannot do it: through the page cache (coherent with
            // O_DIRECT I/O of the same file), into a bounce buffer for a
            // read.
            (Path::PageCache, true) => return rw(buffered, bufs, offset, true),
            (Path::PageCache, false) => buffered,
            (Path::Bounce, _) => &self.file,
        };
        let total: usize = bufs.iter().map(|b| b.len).sum();
        // An aligned bounce buffer, a chunk at a time (the chunk is a
        // multiple of any O_DIRECT alignment).
        let chunk = BOUNCE_CHUNK.min(total);
        let mut bounce = AlignedBuf::new(chunk, self.mem_align)?;
        let mut pos = 0;
        while pos < total {
            let n = chunk.min(total - pos);
            let part = &mut bounce.as_mut_slice()[..n];
            let host = [HostBuf::over(part)];
            if write {
                copy_from_bufs(bufs, pos, part);
                rw(file, &host, offset + pos as u64, true)?;
            } else {
                rw(file, &host, offset + pos as u64, false)?;
                if !copy_in(pos, part) {
                    return Err(std::io::Error::other(
                        "a fence took the guest pages of the read's buffers",
                    ));
                }
            }
            pos += n;
        }
        Ok(())
    }
}

/// O_DIRECT's (memory, offset) alignment for `file`, from statx; 4096 for
/// both when the kernel does not say.
fn dio_align(file: &File) -> (usize, u64) {
    // SAFETY: a zeroed statx is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx on this open fd (empty path, AT_EMPTY_PATH) writes only
    // into `st`, which lives across the call.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut st,
        )
    };
    if r == 0 && st.stx_mask & libc::STATX_DIOALIGN != 0 && st.stx_dio_mem_align > 0 {
        (
            st.stx_dio_mem_align as usize,
            u64::from(st.stx_dio_offset_align.max(1)),
        )
    } else {
        (4096, 4096)
    }
}

/// A zeroed heap buffer with the given alignment.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> std::io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(std::io::Error::from(std::io::ErrorKind::OutOfMemory));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live, initialised (zeroed) allocation of
        // `layout.size()` bytes owned by `self`, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::host_io::copy_into_bufs;
    use super::*;

    #[test]
    fn direct_io_round_trips_aligned_unaligned_and_odd_requests() {
        let path = std::env::temp_dir().join(format!("vmm-direct-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
        let cfg = DiskConfig {
            path: path.clone(),
            direct: true,
            ..Default::default()
        };
        let d = match Direct::open(&cfg) {
            Ok(d) => d,
            Err(e) => {
                // A temp directory on tmpfs has no O_DIRECT.
                eprintln!("SKIP: direct I/O: {e}");
                std::fs::remove_file(&path).unwrap();
                return;
            }
        };
        assert!(d.mem_align.is_power_of_two());
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // Aligned memory (straight O_DIRECT), then misaligned memory (the
        // bounce buffer), then a 512-byte offset (the page cache when the
        // file system wants more).
        let mut aligned = AlignedBuf::new(8192, 4096).unwrap();
        for (i, v) in aligned.as_mut_slice().iter_mut().enumerate() {
            *v = (i % 251) as u8;
        }
        let a = [HostBuf::over(aligned.as_mut_slice())];
        d.transfer(&buffered, &a, 4096, true, &no_copy).unwrap();
        let mut odd = vec![0u8; 8192 + 3];
        let o = [HostBuf::over(&mut odd[3..])];
        let copy_in = |pos: usize, part: &[u8]| {
            copy_into_bufs(&o, pos, part);
            true
        };
        d.transfer(&buffered, &o, 4096, false, &copy_in).unwrap();
        assert_eq!(&odd[3..], aligned.as_mut_slice());
        for v in odd[3..].iter_mut() {
            *v = v.wrapping_add(1);
        }
        d.transfer(&buffered, &o, 512, true, &no_copy).unwrap();
        let mut back = vec![0u8; 8192];
        let bk = [HostBuf::over(&mut back)];
        let copy_back = |pos: usize, part: &[u8]| {
            copy_into_bufs(&bk, pos, part);
            true
        };
        d.transfer(&buffered, &bk, 512, false, &copy_back).unwrap();
        assert_eq!(back, &odd[3..]);
        // Reads that O_DIRECT cannot do straight into guest memory (a
        // misaligned buffer, a misaligned offset when the file system
        // wants more than 512) go through `copy_in`; refused, they fail
        // and write nothing.
        for (buf_off, offset) in [(3, 4096), (0, 512)] {
            let mut guest = AlignedBuf::new(8192 + 4096, 4096).unwrap();
            guest.as_mut_slice().fill(0xee);
            let g = [HostBuf::over(
                &mut guest.as_mut_slice()[buf_off..buf_off + 8192],
            )];
            let straight = buf_off == 0 && offset % d.off_align == 0;
            let r = d.transfer(&buffered, &g, offset, false, &|_, _| false);
            assert_eq!(r.is_ok(), straight, "{buf_off} {offset}");
            if !straight {
                assert!(
                    guest.as_mut_slice().iter().all(|&b| b == 0xee),
                    "{buf_off} {offset}"
                );
            }
        }
        std::fs::remove_file(&path).unwrap();
    }

    /// Writes never copy into guest memory.
    fn no_copy(_: usize, _: &[u8]) -> bool {
        unreachable!("a write copied into guest memory")
    }
}
