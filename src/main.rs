//! `segtrain`: parses the command line and hands it to [`segtrain::cli`].

use std::process::ExitCode;

use clap::Parser;
use segtrain::cli::Cli;

// Training allocates and frees activation-sized buffers every step: mimalloc reuses them
// instead of returning pages to the OS and faulting them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // a closed pipe (`segtrain eval --json | head`) ends the program quietly, as for other
    // command-line tools, instead of a failed print
    #[cfg(unix)]
    // SAFETY: restores the default disposition of SIGPIPE before any thread starts
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Keep freed pages mapped: every training step frees and reallocates the same buffers, and
    // returning them to the OS costs page faults and zeroing on the next step.
    // `mi_option_purge_delay` (index 15 of mimalloc's option enum, v2 and v3) = -1: never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a plain option value before the program starts any other thread
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    match segtrain::cli::run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
