use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vmm::{Args, Vm, VmConfig};

fn main() -> ExitCode {
    // Warnings, plus the VMM's own one-line stop reason (info).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn,vmm=info"))
        .init();
    // clap prints its own message and exits with status 2 on bad usage.
    let args = Args::parse();
    let cfg = match VmConfig::parse(&args).and_then(|c| c.check_files().map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(why) = vmm::host::kvm_unsuitable() {
        if std::env::var_os("VMM_ALLOW_KVM_PVM").is_none() {
            eprintln!("vmm: {why}");
            return ExitCode::from(1);
        }
    }
    let start = Instant::now();
    let result = Vm::new(&cfg).and_then(|vm| vm.run());
    match result {
        Ok(exit) => {
            let code = exit.exit_code();
            if code == 0 {
                log::info!("guest stopped after {:.2?}: {exit:?}", start.elapsed());
            } else if let vmm::VmExit::Signal(sig) = exit {
                eprintln!(
                    "vmm: stopped by signal {sig} after {:.2?}, guest still running",
                    start.elapsed()
                );
            } else {
                eprintln!(
                    "vmm: guest stopped with an error after {:.2?}: {exit:?}",
                    start.elapsed()
                );
            }
            // Leave vCPU threads still in KVM_RUN behind.
            std::process::exit(code);
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(1)
        }
    }
}
