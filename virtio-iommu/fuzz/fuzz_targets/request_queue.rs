//! Drives the request engine with arbitrary descriptor chains over
//! arbitrary guest memory, interleaved with pins, releases, config writes,
//! event delivery, snapshot/restore, device resets, queue-area leases and
//! accesses through them, and `vm_memory::Iommu` translations of arbitrary
//! (address, length) pairs, near the top of the address space too. The
//! device must never panic, must report used lengths within each chain's
//! writable part, must translate a range either in full or not at all, and
//! must still serve a well-formed request at the end.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use virtio_iommu::testing::{attach_body, map_body, unmap_body, Buf, Harness, BUF_BASE};

use virtio_iommu::{AreaSpec, IommuConfig, Limits, Pin, QueueAreas, Status};
use vm_memory::{Bytes, GuestAddress, Permissions};

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes([self.u8()?, self.u8()?]))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from(self.u16()?) | u32::from(self.u16()?) << 16)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from(self.u32()?) | u64::from(self.u32()?) << 32)
    }
    /// An address: low, or within 64 KiB of the top of the space.
    fn addr(&mut self) -> Option<u64> {
        let v = u64::from(self.u16()?);
        Some(if self.u8()? & 1 == 0 {
            v << 8
        } else {
            u64::MAX - v
        })
    }
    /// A length: small, or any 64-bit value.
    fn len(&mut self) -> Option<u64> {
        Some(if self.u8()? & 1 == 0 {
            u64::from(self.u16()?)
        } else {
            self.u64()?
        })
    }
    fn access(&mut self) -> Option<Permissions> {
        Some(match self.u8()? % 3 {
            0 => Permissions::Read,
            1 => Permissions::Write,
            _ => Permissions::ReadWrite,
        })
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

const AREA: u64 = 0x1_0000;

struct Fuzz {
    h: Harness,
    pins: Vec<Pin>,
    leases: Vec<QueueAreas>,
    slot: u64,
    writable: Vec<u64>,
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
        let Some(head) = self.h.req_driver.add(&self.h.mem, bufs) else {
            return; // descriptor table full behind a parked request
        };
        self.writable[usize::from(head)] = writable;
        self.process();
    }

    fn process(&mut self) {
        self.h
            .dev
            .process_requests(&mut self.h.reqq, &self.h.mem)
            .unwrap();
        while let Some((head, used)) = self.h.req_driver.pop_used(&self.h.mem) {
            let w = self.writable[usize::from(head)];
            assert!(u64::from(used) <= w, "used {used} > writable {w}");
        }
    }

    /// Sends a well-formed request from a rotating buffer slot.
    fn send(&mut self, req: &[u8]) -> GuestAddress {
        self.slot = (self.slot + 1) % 64;
        let r = GuestAddress(BUF_BASE + 0x2_0000 + self.slot * 0x200);
        let w = GuestAddress(r.0 + 0x100);
        self.h.mem.write_slice(req, r).unwrap();
        self.h.mem.write_slice(&[0xee; 4], w).unwrap();
        self.submit(&[
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
        w
    }

    fn step(&mut self, input: &mut Input) -> Option<()> {
        match input.u8()? % 12 {
            0 => {
                // Raw chain: addresses anywhere, any lengths, any directions.
                let n = input.u8()? % 6 + 1;
                let mut bufs = Vec::new();
                for _ in 0..n {
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
                    bufs.push(Buf {
                        addr: GuestAddress(addr),
                        len,
                        write: flags & 1 != 0,
                    });
                }
                self.submit(&bufs);
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
                let mut req = vec![0u8; 4];
                match t {
                    0 | 1 => {
                        // ATTACH, or DETACH with the flag in its reserved bytes.
                        req[0] = t + 1;
                        req.extend_from_slice(&attach_body(domain, ep, flags & 1));
                    }
                    2 => {
                        req[0] = 3;
                        req.extend_from_slice(&map_body(domain, iova, end, gpa, flags));
                    }
                    3 => {
                        req[0] = 4;
                        req.extend_from_slice(&unmap_body(domain, iova, end));
                    }
                    4 => {
                        req[0] = 4;
                        req.extend_from_slice(&unmap_body(domain, iova, iova.wrapping_sub(1)));
                    }
                    _ => {
                        req[0] = 3;
                        req.extend_from_slice(&map_body(domain, iova, u64::MAX, gpa, flags));
                    }
                }
                self.send(&req);
            }
            2 => {
                let ep = self.h.dev.endpoint(u32::from(input.u8()? % 3)).unwrap();
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
                let _ = self.h.dev.drain_eventfd().read();
                self.process();
            }
            4 => {
                // Never blocks, pins held or not.
                let v = input.u8()?;
                self.h.dev.write_config(u64::from(input.u8()? % 48), &[v]);
            }
            5 => {
                let len = u32::from(input.u8()?);
                let _ = self.h.ev_driver.add(
                    &self.h.mem,
                    &[Buf {
                        addr: GuestAddress(BUF_BASE + 0xf000),
                        len,
                        write: true,
                    }],
                );
                self.h
                    .dev
                    .process_events(&mut self.h.evq, &self.h.mem)
                    .unwrap();
                while self.h.ev_driver.pop_used(&self.h.mem).is_some() {}
            }
            6 => {
                if let Ok(state) = self.h.dev.snapshot() {
                    let mut fresh = Harness::new(self.h.dev.config().clone());
                    for i in 0..3 {
                        fresh.dev.add_endpoint(i).unwrap();
                    }
                    fresh.dev.restore(&state).expect("a snapshot restores");
                    assert_eq!(fresh.dev.snapshot().unwrap(), state);
                }
            }
            7 => {
                let n = usize::from(input.u8()?);
                let at = BUF_BASE + u64::from(input.u16()?) % AREA;
                let bytes = input.bytes(n).to_vec();
                let _ = self.h.mem.write_slice(&bytes, GuestAddress(at));
            }
            8 => {
                // Lease up to three areas anywhere.
                let ep = self.h.dev.endpoint(u32::from(input.u8()? % 3)).unwrap();
                let mut specs = Vec::new();
                for _ in 0..input.u8()? % 3 + 1 {
                    specs.push(AreaSpec {
                        iova: input.addr()?,
                        len: input.len()?,
                        access: input.access()?,
                    });
                }
                if let Ok(a) = ep.lease_queue_areas(&specs, Arc::new(|| {})) {
                    for ((spec, gpas), want) in a.areas().zip(&specs) {
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
                let phys = self.h.mem.clone();
                if let Some(mem) = self.leases[i].memory(&phys) {
                    let mut buf = vec![0u8; n];
                    let _ = if write {
                        mem.write_slice(&buf, GuestAddress(addr))
                    } else {
                        mem.read_slice(&mut buf, GuestAddress(addr))
                    };
                }
                if input.u8()? & 3 == 0 {
                    self.leases.swap_remove(i);
                }
            }
            10 => {
                // vm_memory::Iommu: all or nothing, never a panic.
                let ep = self.h.dev.endpoint(u32::from(input.u8()? % 3)).unwrap();
                let addr = input.addr()?;
                let len = usize::try_from(input.len()?).unwrap_or(usize::MAX);
                let access = input.access()?;
                let got = vm_memory::Iommu::translate(&ep, GuestAddress(addr), len, access)
                    .map(|it| it.map(|r| r.length).sum::<usize>());
                if let Ok(total) = got {
                    assert_eq!(total, len, "translated in part");
                }
            }
            _ => {
                // Device reset: never blocks; the driver then negotiates
                // again.
                self.h.dev.reset();
                let _ = self.h.dev.reset_pending();
                let f = self.h.dev.device_features();
                self.h.dev.ack_features(f);
            }
        }
        Some(())
    }
}

fn check(data: &[u8]) {
    let mut input = Input(data);
    let mut f = Fuzz {
        h: Harness::new(IommuConfig {
            limits: Limits {
                max_domains: 8,
                max_mappings_per_domain: 64,
                max_mappings_total: 128,
                max_pins_per_endpoint: 16,
                max_pending_faults: 8,
                ..Default::default()
            },
            ..Default::default()
        }),
        pins: Vec::new(),
        leases: Vec::new(),
        slot: 0,
        writable: vec![0; 256],
    };
    for i in 0..3 {
        f.h.dev.add_endpoint(i).unwrap();
    }
    let seed = input.bytes(512).to_vec();
    f.h.mem.write_slice(&seed, GuestAddress(BUF_BASE)).unwrap();
    for _ in 0..64 {
        if f.step(&mut input).is_none() {
            break;
        }
    }
    // Release everything: the device must then serve a valid request, and
    // no reset or bypass change may still be pending.
    f.pins.clear();
    f.leases.clear();
    f.process();
    assert!(f.h.dev.parked_drain().is_none());
    assert!(!f.h.dev.reset_pending());
    let mut req = vec![1u8, 0, 0, 0];
    req.extend_from_slice(&attach_body(100, 2, 0)); // domain 100: never created by the steps
    let tail = f.send(&req);
    let st: u8 = f.h.mem.read_obj(tail).unwrap();
    assert!(
        st == Status::Ok as u8 || st == Status::NoMem as u8,
        "status {st:#x}"
    );
}

fuzz_target!(|data: &[u8]| {
    check(data);
});
