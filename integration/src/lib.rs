//! A small KVM VMM for x86_64 in Cloud Hypervisor's command-line dialect.
//!
//! Phase 1: boots a Linux guest (PVH ELF vmlinux or bzImage) with an
//! initramfs, an in-kernel irqchip and PIT, hardware-reduced ACPI tables
//! (MADT, power-off through an ACPI sleep register) and an MP table, a CMOS
//! RTC and a 16550 serial console on COM1; a PCI bus (ECAM + 0xcf8) with
//! MSI-X and modern virtio-pci devices: the virtio-iommu and one virtio-blk
//! per `--disk`; host PCI devices passed through with VFIO (`--device`).

pub mod acpi;
pub mod boot;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod fence;
pub mod host;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod pci;
pub mod procfs;
pub mod rtc;
pub mod trace;
pub mod vcpu_hold;
pub mod vfio;
pub mod virtio;
pub mod vm;

pub use cli::Args;
pub use config::VmConfig;
pub use vm::{Vm, VmExit};
