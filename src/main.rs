mod cli;

/// mimalloc keeps freed memory for reuse: burn allocates every activation and gradient of a
/// training step afresh, and glibc maps each large one anew (a page fault per 4 KiB each step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in `mi_option_e`: 15 in mimalloc 3 (what libmimalloc-sys 0.1.49 builds)
/// and in mimalloc 2; libmimalloc-sys 0.1 names no constant.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed pages mapped: by default mimalloc hands memory back to the OS 10 ms after it is
/// freed, and a training step (hundreds of ms) then faults and zeroes the same huge pages again
/// every step (`clear_page_erms` was 13 % of a B0 32x32 step; the step is 1.27x faster without
/// it, `effnet bench b0 --train`). `MIMALLOC_PURGE_DELAY` still overrides this.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting a mimalloc option; any value is valid and it takes effect on later frees.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    // `effnet ... | head` closes the pipe early: end quietly, as other command-line tools do,
    // instead of panicking in println! (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
