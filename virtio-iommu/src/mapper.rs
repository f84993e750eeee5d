//! External mappers: endpoints whose DMA is not translated by this device
//! model but by someone else (a VFIO container programming the physical
//! IOMMU, a vDPA device). MAP and UNMAP in the endpoint's domain are
//! propagated to its mapper; a failing mapper makes MAP fail with
//! `S_DEVERR` and leaves no trace of the mapping.

use std::fmt::Debug;
use std::io;

use crate::mapping::MapFlags;

/// Receives the mappings of the domain an endpoint is attached to.
pub trait ExternalMapper: Debug + Send + Sync {
    /// Maps `[iova, iova + size)` to guest-physical `gpa` with `flags`.
    fn map(&self, iova: u64, gpa: u64, size: u64, flags: MapFlags) -> io::Result<()>;
    /// Unmaps `[iova, iova + size)`. When it returns, the external device
    /// must not access the range any more (VFIO's UNMAP_DMA guarantees that).
    fn unmap(&self, iova: u64, size: u64) -> io::Result<()>;
}

#[cfg(feature = "vfio")]
pub use vfio::VfioMapper;

#[cfg(feature = "vfio")]
mod vfio {
    //! A VFIO container as an external mapper.
    //!
    //! It needs a device bound to vfio-pci in the host. The reference
    //! VMM's `--device ...,iommu=on` uses it, and the guest test bed runs
    //! that against a PCI device of its L1 guest behind QEMU's emulated
    //! Intel IOMMU (`tests/guest/tests/passthrough.rs` in the repository).

    use std::io;
    use std::sync::Arc;

    use vfio_ioctls::VfioContainer;
    use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemory, Permissions};

    use super::ExternalMapper;
    use crate::mapping::MapFlags;

    /// Programs a VFIO container with the guest's mappings, turning GPAs
    /// into host virtual addresses through guest memory.
    pub struct VfioMapper<S: GuestAddressSpace> {
        container: Arc<VfioContainer>,
        memory: S,
    }

    impl<S: GuestAddressSpace> VfioMapper<S> {
        /// A mapper over `container`, resolving GPAs in `memory`.
        pub fn new(container: Arc<VfioContainer>, memory: S) -> Self {
            VfioMapper { container, memory }
        }
    }

    impl<S: GuestAddressSpace> std::fmt::Debug for VfioMapper<S> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("VfioMapper")
        }
    }

    impl<S: GuestAddressSpace + Send + Sync> ExternalMapper for VfioMapper<S> {
        fn map(&self, iova: u64, gpa: u64, size: u64, _flags: MapFlags) -> io::Result<()> {
            let mem = self.memory.memory();
            let len = usize::try_from(size)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size"))?;
            // A mapping may cross guest memory regions, which are not
            // contiguous in the host: map each piece separately.
            let mut done = 0usize;
            let result = (|| {
                let bad = |e: vm_memory::GuestMemoryError| {
                    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
                };
                for slice in mem
                    .get_slices(GuestAddress(gpa), len, Permissions::ReadWrite)
                    .map_err(bad)?
                {
                    let slice = slice.map_err(bad)?;
                    // SAFETY: the slice covers `slice.len()` bytes of guest
                    // memory that stays mapped for the VMM's lifetime; the
                    // host never holds a Rust reference into guest memory
                    // (it is accessed only through volatile operations), so
                    // device DMA into it is not undefined behaviour.
                    unsafe {
                        self.container.vfio_dma_map(
                            iova + done as u64,
                            slice.len(),
                            slice.ptr_guard_mut().as_ptr(),
                        )
                    }
                    .map_err(|e| io::Error::other(e.to_string()))?;
                    done += slice.len();
                }
                Ok(())
            })();
            if result.is_err() && done > 0 {
                let _ = self.container.vfio_dma_unmap(iova, done);
            }
            result
        }

        fn unmap(&self, iova: u64, size: u64) -> io::Result<()> {
            let len = usize::try_from(size)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "size"))?;
            self.container
                .vfio_dma_unmap(iova, len)
                .map_err(|e| io::Error::other(e.to_string()))
        }
    }
}
