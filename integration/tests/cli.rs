//! The binary's exit statuses for bad command lines (no KVM needed).

use std::process::Command;

fn vmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("run vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_flag_is_usage_error() {
    let (code, err) = vmm(&["--kernel", "/k", "--bogus"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--bogus"), "{err}");
}

#[test]
fn missing_kernel_names_path() {
    let (code, err) = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/vmlinux"), "{err}");
}

#[test]
fn missing_disk_names_path() {
    let me = env!("CARGO_BIN_EXE_vmm");
    let (code, err) = vmm(&[
        "--kernel",
        me,
        "--disk",
        "path=/nonexistent/disk.img,iommu=on,image_type=raw",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
}

#[test]
fn bad_values_exit_2() {
    let me = env!("CARGO_BIN_EXE_vmm");
    for extra in [
        ["--memory", "size=lots"],
        ["--cpus", "boot=0"],
        ["--disk", "path=/x,image_type=qcow2"],
        ["--serial", "pty"],
        ["--console", "tty"],
    ] {
        let mut args = vec!["--kernel", me];
        args.extend_from_slice(&extra);
        let (code, err) = vmm(&args);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.starts_with("vmm: --"), "{extra:?}: {err}");
    }
}
