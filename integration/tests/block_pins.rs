//! virtio-blk behind the IOMMU: a request's buffers stay pinned until its
//! used entry is published, so an UNMAP covering them replies only after
//! the request completed; and a stuck request is revoked after the grace
//! period. Real device code, real file I/O; the guest is the crate's test
//! driver.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_iommu::protocol::{VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE};
use virtio_iommu::testing::{Buf, Harness, TestDriver};
use virtio_iommu::{IommuConfig, Status};
use vm_memory::{Bytes, GuestAddress};
use vmm::cli::DiskConfig;
use vmm::virtio::block::Block;
use vmm::virtio::{ActiveQueue, VirtioDevice, VirtioInterrupt, VIRTIO_F_ACCESS_PLATFORM};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const EP: u32 = 0x10;
const DOMAIN: u32 = 1;
/// IOVA == GPA window for the block ring and buffers.
const WINDOW: (u64, u64) = (0x40_0000, 0x7f_ffff);
const RING: u64 = 0x40_0000;
const HEADER: u64 = 0x60_0000;
const DATA: u64 = 0x60_1000;
const STATUS: u64 = 0x60_3000;

#[derive(Default)]
struct CountingInterrupt(AtomicU32);

impl VirtioInterrupt for CountingInterrupt {
    fn signal_queue(&self, _queue: u16) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    fn signal_config(&self) {}
}

struct Setup {
    h: Harness,
    blk: Block,
    driver: TestDriver,
    notify: EventFd,
    _disk: tempfile_path::TempPath,
}

mod tempfile_path {
    /// A file removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn setup(name: &str, delay_us: u64) -> Setup {
    let mut h = Harness::new(IommuConfig::default());
    let ep = h.dev.add_endpoint(EP).unwrap();
    assert_eq!(h.attach(DOMAIN, EP, 0), Some(Status::Ok));
    // Identity, with the data page as a mapping of its own so that it
    // can be unmapped alone.
    let rw = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
    for (start, end) in [
        (WINDOW.0, DATA - 1),
        (DATA, DATA + 0xfff),
        (DATA + 0x1000, WINDOW.1),
    ] {
        assert_eq!(h.map(DOMAIN, start, end, start, rw), Some(Status::Ok));
    }
    let path = std::env::temp_dir().join(format!("vmm-{name}-{}.img", std::process::id()));
    let content: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, content).unwrap();
    let cfg = DiskConfig {
        path: path.clone(),
        iommu: true,
        delay_us,
        ..Default::default()
    };
    let mut blk = Block::new(&cfg, h.mem.clone(), Some(ep)).unwrap();
    assert_ne!(blk.device_features() & VIRTIO_F_ACCESS_PLATFORM, 0);
    blk.ack_features(blk.device_features());
    let driver = TestDriver::new(&h.mem, GuestAddress(RING), 256);
    let notify = EventFd::new(EFD_NONBLOCK).unwrap();
    blk.activate(
        vec![ActiveQueue {
            index: 0,
            queue: driver.queue(),
            notify: Some(notify.try_clone().unwrap()),
        }],
        Arc::new(CountingInterrupt::default()),
    )
    .unwrap();
    Setup {
        h,
        blk,
        driver,
        notify,
        _disk: tempfile_path::TempPath(path),
    }
}

/// Submits a 4 KiB IN of sector 8 into DATA.
fn submit_read(s: &mut Setup) {
    let mut hdr = [0u8; 16];
    hdr[8..].copy_from_slice(&8u64.to_le_bytes());
    s.h.mem.write_slice(&hdr, GuestAddress(HEADER)).unwrap();
    s.h.mem
        .write_slice(&[0u8; 4096], GuestAddress(DATA))
        .unwrap();
    s.h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    s.driver
        .add(
            &s.h.mem,
            &[
                Buf {
                    addr: GuestAddress(HEADER),
                    len: 16,
                    write: false,
                },
                Buf {
                    addr: GuestAddress(DATA),
                    len: 4096,
                    write: true,
                },
                Buf {
                    addr: GuestAddress(STATUS),
                    len: 1,
                    write: true,
                },
            ],
        )
        .unwrap();
    s.notify.write(1).unwrap();
}

/// Waits until the queue thread has parsed (and pinned) the request.
fn wait_pinned(s: &mut Setup) {
    let t0 = Instant::now();
    while s.h.dev.endpoint(EP).unwrap().pins_in_flight() == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "request never pinned; used: {:?}",
            s.driver.pop_used(&s.h.mem)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends UNMAP of the data page; returns when its reply is published,
/// with the time it took and whether the block request had completed by
/// then (checked right when the reply appears).
fn unmap_data_page(s: &mut Setup, revoke: bool) -> (Duration, Option<(u16, u32)>) {
    let start = Instant::now();
    let body = virtio_iommu::testing::unmap_body(DOMAIN, DATA, DATA + 0xfff);
    let mut req = vec![virtio_iommu::protocol::req_type::UNMAP, 0, 0, 0];
    req.extend_from_slice(&body);
    let r = GuestAddress(virtio_iommu::testing::BUF_BASE);
    let w = GuestAddress(virtio_iommu::testing::BUF_BASE + 0x10000);
    s.h.mem.write_slice(&req, r).unwrap();
    let reply = s.h.submit(&[
        Buf {
            addr: r,
            len: req.len() as u32,
            write: false,
        },
        Buf {
            addr: w,
            len: 4,
            write: true,
        },
    ]);
    assert!(reply.is_none(), "UNMAP under an in-flight READ must park");
    loop {
        if revoke {
            s.h.dev.revoke_overdue(Instant::now());
        }
        s.h.dev.process_requests(&mut s.h.reqq, &s.h.mem).unwrap();
        if let Some((_, len)) = s.h.req_driver.pop_used(&s.h.mem) {
            assert_eq!(len, 4);
            let st: u8 = s.h.mem.read_obj(w).unwrap();
            assert_eq!(st, Status::Ok as u8);
            let blk_done = s.driver.pop_used(&s.h.mem);
            return (start.elapsed(), blk_done);
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "UNMAP never replied"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn unmap_reply_waits_for_the_read_that_holds_the_page() {
    let mut s = setup("wait", 300_000);
    submit_read(&mut s);

    wait_pinned(&mut s);
    let (took, blk_done) = unmap_data_page(&mut s, false);
    let (_, used_len) = blk_done.expect("UNMAP replied before the READ's used entry");
    assert_eq!(used_len, 4097);
    assert_eq!(s.h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    let mut data = [0u8; 4096];
    s.h.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    for (i, b) in data.iter().enumerate() {
        assert_eq!(u32::from(*b), (4096 + i as u32) % 251, "byte {i}");
    }
    assert!(
        took >= Duration::from_millis(200),
        "the drain covered the injected delay: {took:?}"
    );
    assert_eq!(s.h.dev.endpoint(EP).unwrap().pins_in_flight(), 0);
    s.blk.reset();
}

#[test]
fn stuck_read_is_revoked_after_the_grace_period() {
    // 10 s of injected delay; the IOMMU's grace period is 100 ms.
    let mut s = setup("revoke", 10_000_000);
    submit_read(&mut s);
    wait_pinned(&mut s);
    let (took, blk_done) = unmap_data_page(&mut s, true);
    let (_, used_len) = blk_done.expect("UNMAP replied before the READ's used entry");
    assert_eq!(used_len, 1, "cancelled: status only");
    assert_eq!(
        s.h.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        1,
        "VIRTIO_BLK_S_IOERR"
    );
    assert!(
        took < Duration::from_secs(5),
        "revoked, not waited out: {took:?}"
    );
    assert!(s.h.dev.metrics().snapshot().revocations >= 1);
    s.blk.reset();
}

#[test]
fn control_a_device_that_does_not_drain_replies_under_the_read() {
    // The same race against a device told to skip drains (what upstream
    // devices do): the reply comes at once, before the READ completes, so
    // the checks above are able to fail.
    let mut s = setup("control", 300_000);
    s.h.dev.set_skip_drains_for_testing(true);
    submit_read(&mut s);
    wait_pinned(&mut s);
    assert_eq!(
        s.h.unmap(DOMAIN, DATA, DATA + 0xfff),
        Some(Status::Ok),
        "replied without waiting"
    );
    assert!(
        s.driver.pop_used(&s.h.mem).is_none(),
        "the READ is still in flight after the reply"
    );
    s.blk.reset();
    assert!(s.driver.pop_used(&s.h.mem).is_some());
}
