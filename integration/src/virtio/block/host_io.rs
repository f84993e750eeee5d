//! Host-side I/O on a request's guest buffers ([`HostBuf`]: pinned guest
//! memory mapped in the VMM): copies between them and a host buffer (the
//! bounce path of `direct=on`, GET_ID), and blocking `preadv`/`pwritev`
//! loops over them. The buffered backend (`backend.rs`) and the O_DIRECT
//! one (`direct.rs`) both use them; io_uring takes [`MAX_IOVECS`] too.

use std::fs::File;
use std::os::fd::AsRawFd;

use super::request::HostBuf;

/// `preadv`/`pwritev` (and io_uring's `readv`/`writev`) take at most
/// this many iovecs at once.
pub const MAX_IOVECS: usize = 1024;

/// Copies the guest bytes of `bufs` starting at byte `pos` into `dst`
/// (as many as `bufs` holds from there).
pub fn copy_from_bufs(bufs: &[HostBuf], mut pos: usize, dst: &mut [u8]) {
    let mut done = 0;
    for b in bufs {
        if pos >= b.len {
            pos -= b.len;
            continue;
        }
        let n = (b.len - pos).min(dst.len() - done);
        // SAFETY: `b` covers `b.len` bytes of pinned guest memory (see
        // HostBuf) and `pos + n <= b.len`; `dst` is a separate host buffer.
        unsafe { std::ptr::copy_nonoverlapping(b.ptr.add(pos), dst[done..].as_mut_ptr(), n) };
        done += n;
        pos = 0;
        if done == dst.len() {
            return;
        }
    }
}

/// Copies `src` into the guest bytes of `bufs` starting at byte `pos`;
/// returns the bytes copied (fewer than `src` when `bufs` ends first).
pub fn copy_into_bufs(bufs: &[HostBuf], mut pos: usize, src: &[u8]) -> usize {
    let mut done = 0;
    for b in bufs {
        if pos >= b.len {
            pos -= b.len;
            continue;
        }
        let n = (b.len - pos).min(src.len() - done);
        // SAFETY: as in `copy_from_bufs`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), b.ptr.add(pos), n) };
        done += n;
        pos = 0;
        if done == src.len() {
            break;
        }
    }
    done
}

/// Reads (`write == false`) or writes the whole of `bufs` at `offset`.
pub fn rw(file: &File, bufs: &[HostBuf], mut offset: u64, write: bool) -> std::io::Result<()> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.ptr.cast(),
            iov_len: b.len,
        })
        .collect();
    let mut start = 0;
    while start < iov.len() {
        let end = (start + MAX_IOVECS).min(iov.len());
        let chunk = &iov[start..end];
        let off = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec covers pinned guest memory that stays mapped
        // (see HostBuf); the kernel only accesses those bytes.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), chunk.as_ptr(), chunk.len() as i32, off)
            } else {
                libc::preadv(file.as_raw_fd(), chunk.as_ptr(), chunk.len() as i32, off)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        offset += n as u64;
        // Skip what was transferred, trimming a partly done iovec.
        let mut n = n as usize;
        while n > 0 && start < iov.len() {
            if n >= iov[start].iov_len {
                n -= iov[start].iov_len;
                start += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                iov[start].iov_base = unsafe { iov[start].iov_base.cast::<u8>().add(n) }.cast();
                iov[start].iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    #[test]
    fn rw_handles_many_buffers() {
        let dir = std::env::temp_dir().join(format!("vmm-blk-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 8192]).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dir)
            .unwrap();
        let mut src: Vec<Vec<u8>> = (0..2000u32).map(|i| vec![i as u8; 2]).collect();
        let bufs: Vec<HostBuf> = src.iter_mut().map(|v| HostBuf::over(v)).collect();
        rw(&f, &bufs, 512, true).unwrap();
        let mut dst = vec![0u8; 4000];
        let one = [HostBuf::over(&mut dst)];
        rw(&f, &one, 512, false).unwrap();
        for i in 0..2000usize {
            assert_eq!(&dst[2 * i..2 * i + 2], &[i as u8; 2]);
        }
        let mut big = vec![0u8; 9000];
        let past = [HostBuf::over(&mut big)];
        assert!(rw(&f, &past, 0, false).is_err(), "EOF is an error");
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn copy_into_bufs_spans_buffers() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 30];
        let bufs = [HostBuf::over(&mut a), HostBuf::over(&mut b)];
        assert_eq!(copy_into_bufs(&bufs, 0, b"abcdefghij0123456789"), 20);
        assert_eq!(&a, b"abc");
        assert_eq!(&b[..17], b"defghij0123456789");
    }

    #[test]
    fn bounce_copies_span_buffers() {
        let mut a = [1u8, 2, 3];
        let mut b = [4u8, 5, 6, 7];
        let bufs = [HostBuf::over(&mut a), HostBuf::over(&mut b)];
        let mut out = [0u8; 4];
        copy_from_bufs(&bufs, 2, &mut out);
        assert_eq!(out, [3, 4, 5, 6]);
        copy_into_bufs(&bufs, 1, &[9, 9, 9, 9, 9]);
        assert_eq!((a, b), ([1, 9, 9], [9, 9, 9, 7]));
    }
}
