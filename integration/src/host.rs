//! What the host's KVM can run.
//!
//! Some hosts expose `/dev/kvm` from kvm-pvm, a KVM flavour that runs only
//! guests built for it: a stock Linux kernel never gets past its first
//! instructions, and the VMM would wait for it forever. The VMM checks for
//! it before it creates a VM and says what to do instead.

use std::path::Path;

/// Why this host's KVM cannot boot a stock kernel, if it cannot.
pub fn kvm_unsuitable() -> Option<String> {
    kvm_unsuitable_in(
        &std::fs::read_to_string("/proc/modules").unwrap_or_default(),
        Path::new("/sys/module/kvm_pvm").exists(),
    )
}

fn kvm_unsuitable_in(modules: &str, pvm_sysfs: bool) -> Option<String> {
    let pvm = pvm_sysfs || modules.lines().any(|l| l.starts_with("kvm_pvm "));
    pvm.then(|| {
        "/dev/kvm on this host is kvm-pvm, which cannot boot a stock Linux kernel (the guest \
         would hang at its first instruction). Run the guest nested instead: `ci/demo` and \
         `ci/test guest` do that (QEMU TCG runs a Linux with KVM, which runs this VMM). Set \
         VMM_ALLOW_KVM_PVM=1 to try anyway."
            .to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_pvm_is_recognised() {
        assert!(kvm_unsuitable_in("kvm_pvm 184320 0 - Live 0x0\n", false).is_some());
        assert!(kvm_unsuitable_in("", true).is_some());
        assert!(
            kvm_unsuitable_in("kvm_amd 200000 0 - Live 0x0\nkvm 1 1 kvm_amd\n", false).is_none()
        );
    }
}
