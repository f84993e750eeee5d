//! Queue-area translations through the real device: a virtqueue run
//! through leased areas, and every invalidation that must revoke them
//! (UNMAP, DETACH, ATTACH-move, bypass 1 -> 0, reset), with the reply
//! waiting for open access sections exactly like a pin.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use virtio_iommu::protocol::{req_type, CONFIG_BYPASS_OFFSET};
use virtio_iommu::testing::{unmap_body, Buf, Harness, TestDriver};
use virtio_iommu::{AreaSpec, IommuConfig, QueueAreas, RevokeHook, Status, TranslateError};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

const EP: u32 = 8;
const DOM: u32 = 1;
/// The rings (identity-mapped: the test driver writes them by GPA).
const RING: u64 = 0x40_0000;
const RING_END: u64 = 0x40_ffff;
/// Request buffers (identity-mapped too).
const DATA: u64 = 0x50_0000;
const DATA_END: u64 = 0x50_ffff;
const QSIZE: u16 = 16;
const RW: u32 = 3;

struct Rig {
    h: Harness,
    driver: TestDriver,
    queue: Queue,
    revoked: Arc<AtomicUsize>,
}

fn hook(count: &Arc<AtomicUsize>) -> RevokeHook {
    let c = count.clone();
    Arc::new(move || {
        c.fetch_add(1, Ordering::SeqCst);
    })
}

fn rig_with(config: IommuConfig) -> Rig {
    let mut h = Harness::new(config);
    h.dev.add_endpoint(EP).unwrap();
    h.dev.add_endpoint(EP + 1).unwrap();
    assert_eq!(h.attach(DOM, EP, 0), Some(Status::Ok));
    assert_eq!(h.map(DOM, RING, RING_END, RING, RW), Some(Status::Ok));
    assert_eq!(h.map(DOM, DATA, DATA_END, DATA, RW), Some(Status::Ok));
    let driver = TestDriver::new(&h.mem, GuestAddress(RING), QSIZE);
    let queue = driver.queue();
    Rig {
        h,
        driver,
        queue,
        revoked: Arc::new(AtomicUsize::new(0)),
    }
}

fn rig() -> Rig {
    rig_with(IommuConfig::default())
}

impl Rig {
    fn specs(&self) -> [AreaSpec; 3] {
        let q = &self.queue;
        AreaSpec::split_queue(q.desc_table(), q.avail_ring(), q.used_ring(), q.size())
    }

    fn lease(&self) -> QueueAreas {
        self.h
            .dev
            .endpoint(EP)
            .unwrap()
            .lease_queue_areas(&self.specs(), hook(&self.revoked))
            .unwrap()
    }

    /// The driver posts a request: a 16-byte header and a writable byte.
    fn post(&mut self) -> u16 {
        self.h
            .mem
            .write_slice(&[0xab; 16], GuestAddress(DATA))
            .unwrap();
        self.driver
            .add(
                &self.h.mem,
                &[
                    Buf {
                        addr: GuestAddress(DATA),
                        len: 16,
                        write: false,
                    },
                    Buf {
                        addr: GuestAddress(DATA + 0x100),
                        len: 1,
                        write: true,
                    },
                ],
            )
            .unwrap()
    }

    /// The device serves one request through the areas; false if revoked.
    fn serve_one(&mut self, areas: &QueueAreas) -> bool {
        let Some(mem) = areas.memory(&self.h.mem) else {
            return false;
        };
        let chain = self.queue.pop_descriptor_chain(&mem).expect("a chain");
        let head = chain.head_index();
        let descs: Vec<_> = chain.collect();
        assert_eq!(descs.len(), 2);
        // The buffers are outside the areas: pinned for each access.
        let hdr: [u8; 16] = mem.read_obj(descs[0].addr()).unwrap();
        assert_eq!(hdr, [0xab; 16]);
        mem.write_obj(0u8, descs[1].addr()).unwrap();
        self.queue.add_used(&mem, head, 1).unwrap();
        true
    }

    /// Posts an UNMAP without processing it.
    fn post_unmap(&mut self, start: u64, end: u64) {
        self.h
            .post(0, req_type::UNMAP, &unmap_body(DOM, start, end));
    }

    /// Runs the request queue; the status of the reply if one came.
    fn reply(&mut self) -> Option<u8> {
        self.h
            .dev
            .process_requests(&mut self.h.reqq, &self.h.mem)
            .unwrap();
        self.h.req_driver.pop_used(&self.h.mem)?;
        Some(self.h.posted_status(0))
    }

    fn areas_revoked(&self) -> u64 {
        self.h.dev.metrics().snapshot().areas_revoked
    }
}

#[test]
fn a_queue_runs_through_leased_areas() {
    let mut r = rig();
    let areas = r.lease();
    assert!(!areas.is_revoked());
    let gpas: Vec<u64> = areas.areas().map(|(_, g)| g[0].gpa).collect();
    assert_eq!(
        gpas,
        vec![
            r.queue.desc_table(),
            r.queue.avail_ring(),
            r.queue.used_ring()
        ]
    );
    for _ in 0..3 * QSIZE {
        let head = r.post();
        assert!(r.serve_one(&areas));
        assert_eq!(r.driver.pop_used(&r.h.mem), Some((head, 1)));
    }
    assert_eq!(r.revoked.load(Ordering::SeqCst), 0);
    assert_eq!(r.h.dev.pending_faults(), 0);
}

#[test]
fn unmap_of_a_ring_revokes_the_areas_and_replies_at_once_when_no_section_is_open() {
    let mut r = rig();
    let areas = r.lease();
    r.post_unmap(RING, RING_END);
    assert_eq!(r.reply(), Some(Status::Ok as u8));
    assert_eq!(r.revoked.load(Ordering::SeqCst), 1, "the device was told");
    assert!(areas.is_revoked());
    assert!(
        areas.memory(&r.h.mem).is_none(),
        "no section opens any more"
    );
    assert!(areas.enter().is_none());
    assert_eq!(r.areas_revoked(), 1);
    assert_eq!(r.h.dev.pending_faults(), 1, "an R_MAPPING record");
    // The device stops: its request is never served.
    r.post();
    assert!(!r.serve_one(&areas));
}

#[test]
fn unmap_of_a_ring_waits_for_an_open_section() {
    let mut r = rig();
    let areas = r.lease();
    let phys = r.h.mem.clone();
    let section = areas.memory(&phys).unwrap();
    r.post_unmap(RING, RING_END);
    assert_eq!(r.reply(), None, "parked while the section is open");
    assert_eq!(r.revoked.load(Ordering::SeqCst), 1, "told before the reply");
    // The section may finish its access: the translation is still there.
    section
        .write_obj(7u16, GuestAddress(r.queue.used_ring() + 2))
        .unwrap();
    assert!(r.h.dev.parked_drain().is_some());
    drop(section);
    assert_eq!(r.reply(), Some(Status::Ok as u8));
    assert_eq!(r.h.dev.metrics().snapshot().drains, 1);
}

#[test]
fn a_section_open_on_another_thread_holds_the_reply_until_it_ends() {
    let mut r = rig();
    let areas = Arc::new(r.lease());
    let mem = r.h.mem.clone();
    let (entered_tx, entered_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let t = {
        let areas = areas.clone();
        std::thread::spawn(move || {
            let section = areas.memory(&mem).unwrap();
            entered_tx.send(()).unwrap();
            go_rx.recv().unwrap();
            drop(section);
        })
    };
    entered_rx.recv().unwrap();
    r.post_unmap(RING, RING_END);
    assert_eq!(r.reply(), None);
    go_tx.send(()).unwrap();
    t.join().unwrap();
    assert!(r.h.dev.wait_parked(std::time::Duration::from_secs(30)));
    assert_eq!(r.reply(), Some(Status::Ok as u8));
}

#[test]
fn unmap_elsewhere_leaves_the_areas_alone() {
    let mut r = rig();
    let areas = r.lease();
    r.post_unmap(DATA, DATA_END);
    assert_eq!(r.reply(), Some(Status::Ok as u8));
    assert!(!areas.is_revoked());
    assert_eq!(r.revoked.load(Ordering::SeqCst), 0);
}

#[test]
fn detach_revokes_the_areas() {
    let mut r = rig();
    let areas = r.lease();
    assert_eq!(r.h.detach(DOM, EP), Some(Status::Ok));
    assert!(areas.is_revoked());
    assert_eq!(r.revoked.load(Ordering::SeqCst), 1);
}

#[test]
fn attach_moving_the_endpoint_revokes_the_areas() {
    let mut r = rig();
    let areas = r.lease();
    // The new domain maps the same ring: still a different translation.
    assert_eq!(r.h.attach(DOM + 1, EP, 0), Some(Status::Ok));
    assert!(areas.is_revoked());
}

#[test]
fn attach_of_another_endpoint_leaves_the_areas_alone() {
    let mut r = rig();
    let areas = r.lease();
    assert_eq!(r.h.attach(DOM, EP + 1, 0), Some(Status::Ok));
    assert_eq!(r.h.detach(DOM, EP + 1), Some(Status::Ok));
    assert!(!areas.is_revoked());
}

#[test]
fn bypass_off_revokes_areas_leased_through_the_identity_translation() {
    let mut r = rig_with(IommuConfig {
        bypass: true,
        ..Default::default()
    });
    // Endpoint EP + 1 is unattached: it translates by identity.
    let areas =
        r.h.dev
            .endpoint(EP + 1)
            .unwrap()
            .lease_queue_areas(&r.specs(), hook(&r.revoked))
            .unwrap();
    let section = areas.enter().unwrap();
    r.h.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
    assert!(areas.is_revoked());
    let mut b = [0u8];
    r.h.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
    assert_eq!(b[0], 1, "reads 1 while the open section drains");
    drop(section);
    r.h.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut b);
    assert_eq!(b[0], 0);
}

#[test]
fn reset_revokes_the_areas_and_completes_when_sections_end() {
    let mut r = rig();
    let areas = r.lease();
    let section = areas.enter().unwrap();
    assert!(!r.h.dev.reset(), "a section is open");
    assert!(areas.is_revoked());
    assert!(r.h.dev.reset_pending());
    drop(section);
    assert!(!r.h.dev.reset_pending());
    // Fault records from before the reset are dropped with it.
    assert_eq!(r.h.dev.pending_faults(), 0);
}

#[test]
fn without_drain_areas_are_never_revoked() {
    let mut r = rig_with(IommuConfig {
        drain: false,
        ..Default::default()
    });
    let areas = r.lease();
    let section = areas.enter().unwrap();
    r.post_unmap(RING, RING_END);
    assert_eq!(r.reply(), Some(Status::Ok as u8), "replies at once");
    assert!(!areas.is_revoked(), "the control mode keeps the stale ring");
    drop(section);
    assert_eq!(r.revoked.load(Ordering::SeqCst), 0);
}

#[test]
fn dropping_the_areas_unregisters_them() {
    let mut r = rig();
    let areas = r.lease();
    drop(areas);
    r.post_unmap(RING, RING_END);
    assert_eq!(r.reply(), Some(Status::Ok as u8));
    assert_eq!(r.revoked.load(Ordering::SeqCst), 0);
    assert_eq!(r.areas_revoked(), 0);
}

#[test]
fn leasing_fails_with_a_fault_when_an_area_is_not_translatable() {
    let r = rig();
    let ep = r.h.dev.endpoint(EP).unwrap();
    let mut specs = r.specs();
    specs[2].iova = 0x90_0000; // unmapped used ring
    assert_eq!(
        ep.lease_queue_areas(&specs, hook(&r.revoked)).unwrap_err(),
        TranslateError::NotMapped(0x90_0000)
    );
    assert_eq!(r.h.dev.pending_faults(), 1);
    let wrap = [AreaSpec {
        iova: u64::MAX - 15,
        len: 256,
        access: Permissions::Read,
    }];
    assert_eq!(
        ep.lease_queue_areas(&wrap, hook(&r.revoked)).unwrap_err(),
        TranslateError::BadRange
    );
    assert_eq!(r.h.dev.pending_faults(), 2);
    let blocked = r.h.dev.endpoint(EP + 1).unwrap();
    assert_eq!(
        blocked
            .lease_queue_areas(&r.specs(), hook(&r.revoked))
            .unwrap_err(),
        TranslateError::NotAttached
    );
    // Nothing was registered: an UNMAP of the ring revokes nothing.
    let mut r = r;
    r.post_unmap(RING, RING_END);
    assert_eq!(r.reply(), Some(Status::Ok as u8));
    assert_eq!(r.areas_revoked(), 0);
}

#[test]
fn accesses_outside_the_areas_are_checked_like_pins() {
    let r = rig();
    let areas = r.lease();
    let mem = areas.memory(&r.h.mem).unwrap();
    // Used ring is write-only in the lease: a read goes through a pin,
    // which the (read-write) mapping allows.
    assert!(mem
        .read_obj::<u16>(GuestAddress(r.queue.used_ring()))
        .is_ok());
    // Unmapped, and wrapping: errors with faults, never a panic.
    assert!(mem.read_obj::<u32>(GuestAddress(0x90_0000)).is_err());
    assert!(mem.read_obj::<u64>(GuestAddress(u64::MAX - 3)).is_err());
    assert!(!mem.check_range(GuestAddress(u64::MAX - 15), 256, Permissions::Read));
    assert!(r.h.dev.pending_faults() >= 2);
}

/// A chain whose head refers to an indirect table at `table` (2 entries):
/// the descriptor in the (leased) descriptor table is rewritten after the
/// driver posted an ordinary request. Returns what the device's iteration
/// yields.
fn serve_indirect(r: &mut Rig, areas: &QueueAreas, table: u64) -> Vec<(u64, u32)> {
    const F_INDIRECT: u16 = 4;
    let head = r.post();
    let at = GuestAddress(r.queue.desc_table() + u64::from(head) * 16);
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&table.to_le_bytes());
    desc[8..12].copy_from_slice(&32u32.to_le_bytes());
    desc[12..14].copy_from_slice(&F_INDIRECT.to_le_bytes());
    r.h.mem.write_slice(&desc, at).unwrap();
    let mem = areas.memory(&r.h.mem).unwrap();
    let chain = r.queue.pop_descriptor_chain(&mem).expect("a chain");
    chain.map(|d| (d.addr().0, d.len())).collect()
}

#[test]
fn an_indirect_table_is_read_only_through_a_translation() {
    // The guest-physical page at TABLE holds a valid two-entry table (the
    // header and status of a request); as an IOVA, TABLE is not mapped.
    const TABLE: u64 = 0x60_0000;
    let mut r = rig();
    let mut entries = [0u8; 32];
    entries[..8].copy_from_slice(&DATA.to_le_bytes());
    entries[8..12].copy_from_slice(&16u32.to_le_bytes());
    entries[12..14].copy_from_slice(&1u16.to_le_bytes()); // NEXT
    entries[14..16].copy_from_slice(&1u16.to_le_bytes());
    entries[16..24].copy_from_slice(&(DATA + 0x100).to_le_bytes());
    entries[24..28].copy_from_slice(&1u32.to_le_bytes());
    entries[28..30].copy_from_slice(&2u16.to_le_bytes()); // WRITE
    r.h.mem.write_slice(&entries, GuestAddress(TABLE)).unwrap();
    let areas = r.lease();

    // Unmapped: the table is outside the areas, so it is read through a
    // pin, which faults; the chain ends without a descriptor, and nothing
    // of the guest-physical page was taken for descriptors.
    let faults = r.h.dev.pending_faults();
    assert_eq!(serve_indirect(&mut r, &areas, TABLE), vec![]);
    assert!(r.h.dev.pending_faults() > faults);

    // Mapped (to the same page): the table is read through the
    // translation and its entries are the chain.
    assert_eq!(
        r.h.map(DOM, TABLE, TABLE + 0xfff, TABLE, RW),
        Some(Status::Ok)
    );
    assert_eq!(
        serve_indirect(&mut r, &areas, TABLE),
        vec![(DATA, 16), (DATA + 0x100, 1)]
    );
}
