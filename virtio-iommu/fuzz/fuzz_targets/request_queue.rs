//! Drives the request engine with arbitrary descriptor chains over
//! arbitrary guest memory, interleaved with pins, releases, config writes,
//! event delivery, snapshot/restore, device resets, queue-area leases and
//! accesses through them, and `vm_memory::Iommu` translations of arbitrary
//! (address, length) pairs, near the top of the address space too. The
//! device must never panic, must report used lengths within each chain's
//! writable part, must translate a range either in full or not at all, and
//! must still serve a well-formed request at the end (unless a chain gave
//! it a writable buffer over the harness's own rings or request slots:
//! the device writes there as told, and the guest has then broken its own
//! queue).
//!
//! The device, its guest memory and a second device for restores are built
//! once per process and reset between inputs (see `common`): an input
//! behaves the same whether it runs first or after many others.

#![no_main]

mod common;

use common::{Input, Req, World, NUM_SLOTS};
use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;
use std::sync::Arc;
use virtio_iommu::testing::{Buf, BUF_BASE};
use virtio_iommu::{
    AreaSpec, IommuConfig, Limits, Pin, QueueAreas, RevokeHook, Status, VirtioIommu,
};
use vm_memory::{Bytes, GuestAddress, Permissions};

const AREA: u64 = 0x1_0000;

struct Fuzz {
    w: World,
    /// Restores of step 6 go into this device (reset before each).
    scratch: VirtioIommu,
    hook: RevokeHook,
    pins: Vec<Pin>,
    leases: Vec<QueueAreas>,
    slot: u64,
    writable: Vec<u64>,
    /// A chain gave the device a writable buffer over the harness's own
    /// rings or request slots: the device writes its reply there, as
    /// hardware would, and the guest has corrupted its own queue, so the
    /// final request may go unseen (no panic is still the rule).
    clobbered: bool,
}

impl Fuzz {
    /// Makes a chain available and processes the queue; checks every used
    /// length against the writable size of its chain.
    fn submit(&mut self, bufs: &[Buf]) {
        let writable = bufs
            .iter()
            .filter(|b| b.write)
            .map(|b| u64::from(b.len))
            .sum();
        let Some(head) = self.w.add_req(bufs) else {
            return; // descriptor table full behind a parked request
        };
        self.writable[usize::from(head)] = writable;
        self.process();
    }

    fn process(&mut self) {
        self.w
            .dev
            .process_requests(&mut self.w.reqq, &self.w.mem)
            .unwrap();
        while let Some((head, used)) = self.w.pop_req() {
            let w = self.writable[usize::from(head)];
            assert!(u64::from(used) <= w, "used {used} > writable {w}");
        }
    }

    /// Sends a well-formed request from a rotating buffer slot (the
    /// world's slot layout) and processes the queue; returns its tail.
    fn send(&mut self, req: &[u8]) -> GuestAddress {
        self.slot = (self.slot + 1) % NUM_SLOTS;
        // The descriptor table may be full behind a parked request.
        if let Some(head) = self.w.post(self.slot, req) {
            // The chain's writable part is its 4-byte tail.
            self.writable[usize::from(head)] = 4;
            self.process();
        }
        World::tail(self.slot)
    }

    fn step(&mut self, input: &mut Input) -> Option<()> {
        match input.u8()? % 12 {
            0 => {
                // Raw chain: addresses anywhere, any lengths, any directions.
                let n = usize::from(input.u8()? % 6 + 1);
                let mut bufs = [Buf {
                    addr: GuestAddress(0),
                    len: 0,
                    write: false,
                }; 6];
                for b in &mut bufs[..n] {
                    let flags = input.u8()?;
                    let addr = if flags & 0x80 != 0 {
                        u64::from(input.u32()?) << 8
                    } else {
                        BUF_BASE + u64::from(input.u16()?) % AREA
                    };
                    let len = if flags & 0x40 != 0 {
                        input.u32()?
                    } else {
                        u32::from(input.u8()?)
                    };
                    *b = Buf {
                        addr: GuestAddress(addr),
                        len,
                        write: flags & 1 != 0,
                    };
                }
                self.clobbered |= bufs[..n]
                    .iter()
                    .any(|b| b.write && self.w.overlaps_harness(b.addr.0, b.len));
                self.submit(&bufs[..n]);
            }
            1 => {
                // Well-formed request with fuzzed fields, to reach deep states.
                let t = input.u8()? % 6;
                let domain = u32::from(input.u8()? % 10);
                let ep = u32::from(input.u8()? % 4);
                let iova = u64::from(input.u16()?) << 12;
                let end = iova + (u64::from(input.u8()? % 4) + 1) * 4096 - 1;
                let gpa = u64::from(input.u16()?) << 12;
                let flags = u32::from(input.u8()? % 8);
                let req = match t {
                    // ATTACH, or DETACH with the flag in its reserved bytes.
                    0 | 1 => Req::new(t + 1).u32(domain).u32(ep).u32(flags & 1).u32(0),
                    2 => Req::map(domain, iova, end, gpa, flags),
                    3 => Req::unmap(domain, iova, end),
                    4 => Req::unmap(domain, iova, iova.wrapping_sub(1)),
                    _ => Req::map(domain, iova, u64::MAX, gpa, flags),
                };
                self.send(req.bytes());
            }
            2 => {
                let ep = self.w.dev.endpoint(u32::from(input.u8()? % 3)).unwrap();
                let iova = u64::from(input.u16()?) << 8;
                let len = u64::from(input.u16()?) + 1;
                let access = match input.u8()? % 3 {
                    0 => Permissions::Read,
                    1 => Permissions::Write,
                    _ => Permissions::ReadWrite,
                };
                if let Ok(p) = ep.pin(iova, len, access) {
                    let total: u64 = p.ranges().iter().map(|r| r.len).sum();
                    assert_eq!(total, len);
                    self.pins.push(p);
                }
            }
            3 => {
                // Release pins; a parked request may now complete.
                let keep = usize::from(input.u8()?) % (self.pins.len() + 1);
                self.pins.truncate(keep);
                let _ = self.w.dev.drain_eventfd().read();
                self.process();
            }
            4 => {
                // Never blocks, pins held or not.
                let v = input.u8()?;
                self.w.dev.write_config(u64::from(input.u8()? % 48), &[v]);
            }
            5 => {
                let len = u32::from(input.u8()?);
                let _ = self.w.add_ev(&[Buf {
                    addr: GuestAddress(BUF_BASE + 0xf000),
                    len,
                    write: true,
                }]);
                self.w
                    .dev
                    .process_events(&mut self.w.evq, &self.w.mem)
                    .unwrap();
                while self.w.pop_ev().is_some() {}
            }
            6 => {
                if let Ok(state) = self.w.dev.snapshot() {
                    // The scratch device is as fresh as a new one: it is
                    // reset after each restore (nothing pins through it),
                    // so it keeps nothing past this input either.
                    self.scratch.restore(&state).expect("a snapshot restores");
                    assert_eq!(self.scratch.snapshot().unwrap(), state);
                    assert!(self.scratch.system_reset());
                }
            }
            7 => {
                let n = usize::from(input.u8()?);
                let at = BUF_BASE + u64::from(input.u16()?) % AREA;
                let _ = self.w.mem.write_slice(input.bytes(n), GuestAddress(at));
            }
            8 => {
                // Lease up to three areas anywhere.
                let ep = self.w.dev.endpoint(u32::from(input.u8()? % 3)).unwrap();
                let n = usize::from(input.u8()? % 3 + 1);
                let mut specs = [AreaSpec {
                    iova: 0,
                    len: 0,
                    access: Permissions::Read,
                }; 3];
                for s in &mut specs[..n] {
                    *s = AreaSpec {
                        iova: input.addr()?,
                        len: input.len()?,
                        access: input.access()?,
                    };
                }
                let specs = &specs[..n];
                if let Ok(a) = ep.lease_queue_areas(specs, self.hook.clone()) {
                    for ((spec, gpas), want) in a.areas().zip(specs) {
                        assert_eq!(spec, *want);
                        let total: u64 = gpas.iter().map(|r| r.len).sum();
                        assert_eq!(total, want.len, "a lease translates in full");
                    }
                    self.leases.push(a);
                }
            }
            9 => {
                // An access through a lease, inside or outside its areas.
                if self.leases.is_empty() {
                    return Some(());
                }
                let i = usize::from(input.u8()?) % self.leases.len();
                let addr = input.addr()?;
                let n = usize::from(input.u8()?);
                let write = input.u8()? & 1 != 0;
                if let Some(mem) = self.leases[i].memory(&self.w.mem) {
                    let mut buf = [0u8; 255];
                    let buf = &mut buf[..n];
                    let _ = if write {
                        mem.write_slice(buf, GuestAddress(addr))
                    } else {
                        mem.read_slice(buf, GuestAddress(addr))
                    };
                }
                if input.u8()? & 3 == 0 {
                    self.leases.swap_remove(i);
                }
            }
            10 => {
                // vm_memory::Iommu: all or nothing, never a panic.
                let ep = self.w.dev.endpoint(u32::from(input.u8()? % 3)).unwrap();
                let addr = input.addr()?;
                let mut len = input.len()?;
                let access = input.access()?;
                let valid = len
                    .checked_sub(1)
                    .and_then(|l| addr.checked_add(l))
                    .is_some_and(|last| last < u64::MAX);
                if valid && ep.is_bypassed() {
                    // An identity range needs one IOTLB fill per GiB, and
                    // one of more than 4096 pieces is refused only after
                    // 8192 fills (~0.1 s here): keep it to 8 GiB (virtio's
                    // descriptor lengths stop at 4 GiB). The translate
                    // target does the same.
                    len = len.min(8 << 30);
                }
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let got = vm_memory::Iommu::translate(&ep, GuestAddress(addr), len, access)
                    .map(|it| it.map(|r| r.length).sum::<usize>());
                if let Ok(total) = got {
                    assert_eq!(total, len, "translated in part");
                    assert!(total > 0, "an empty range translated");
                }
            }
            _ => {
                // Device reset: never blocks; the driver then negotiates
                // again.
                self.w.dev.reset();
                let _ = self.w.dev.reset_pending();
                let f = self.w.dev.device_features();
                self.w.dev.ack_features(f);
            }
        }
        Some(())
    }
}

fn config() -> IommuConfig {
    IommuConfig {
        limits: Limits {
            max_domains: 8,
            max_mappings_per_domain: 64,
            max_mappings_total: 128,
            max_pins_per_endpoint: 16,
            max_pending_faults: 8,
            ..Default::default()
        },
        ..Default::default()
    }
}

impl Fuzz {
    fn new() -> Self {
        let eps: Vec<_> = (0..3).map(|i| (i, Vec::new())).collect();
        let mut scratch = VirtioIommu::new(config()).unwrap();
        for i in 0..3 {
            scratch.add_endpoint(i).unwrap();
        }
        Fuzz {
            w: World::new(config(), &eps),
            scratch,
            hook: Arc::new(|| {}),
            pins: Vec::new(),
            leases: Vec::new(),
            slot: 0,
            writable: vec![0; 256],
            clobbered: false,
        }
    }

    fn check(&mut self, data: &[u8]) {
        let mut input = Input(data);
        let seed = input.bytes(512);
        self.w
            .mem
            .write_slice(seed, GuestAddress(BUF_BASE))
            .unwrap();
        for _ in 0..64 {
            if self.step(&mut input).is_none() {
                break;
            }
        }
        // Release everything: the device must then serve a valid request,
        // and no reset or bypass change may still be pending.
        self.pins.clear();
        self.leases.clear();
        self.process();
        assert!(self.w.dev.parked_drain().is_none());
        assert!(!self.w.dev.reset_pending());
        // Domain 100: never created by the steps.
        let tail = self.send(Req::attach(100, 2, 0).bytes());
        let st: u8 = self.w.mem.read_obj(tail).unwrap();
        assert!(
            st == Status::Ok as u8 || st == Status::NoMem as u8 || self.clobbered,
            "status {st:#x}"
        );
        // Back to the state `new` left: the next input starts there too.
        self.w.reset();
        self.slot = 0;
        self.writable.fill(0);
        self.clobbered = false;
    }
}

thread_local! {
    static FUZZ: RefCell<Option<Fuzz>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    FUZZ.with_borrow_mut(|f| f.get_or_insert_with(Fuzz::new).check(data));
});
