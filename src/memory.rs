//! The memory this process can still allocate, and byte counts as people read them: the
//! checks that refuse a run, an export or an inference too large for the machine.

/// `"1.5 GiB"`, `"120 MiB"`, `"3.2e6 GiB"`.
pub fn gib(bytes: f64) -> String {
    let g = bytes / (1u64 << 30) as f64;
    if g >= 1e5 {
        format!("{g:.1e} GiB")
    } else if g >= 1.0 {
        format!("{g:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes / (1u64 << 20) as f64)
    }
}

/// The memory this process can still allocate, in bytes: the least of the system's available
/// memory (`MemAvailable` of /proc/meminfo), the cgroup's limit less its usage (cgroup v2) and
/// the address-space limit (RLIMIT_AS) less the current size. None where none is known.
pub fn available_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let meminfo_kib = |text: &str, key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    };
    let mut limits = vec![];
    if let Some(kib) = read("/proc/meminfo").and_then(|t| meminfo_kib(&t, "MemAvailable:")) {
        limits.push(kib.saturating_mul(1024));
    }
    if let (Some(max), Some(current)) = (
        read("/sys/fs/cgroup/memory.max").and_then(|t| t.trim().parse::<u64>().ok()),
        read("/sys/fs/cgroup/memory.current").and_then(|t| t.trim().parse::<u64>().ok()),
    ) {
        limits.push(max.saturating_sub(current));
    }
    #[cfg(unix)]
    {
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct it is given
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rl) } == 0
            && rl.rlim_cur != libc::RLIM_INFINITY
        {
            let size = read("/proc/self/status")
                .and_then(|t| meminfo_kib(&t, "VmSize:"))
                .unwrap_or(0);
            limits.push(rl.rlim_cur.saturating_sub(size.saturating_mul(1024)));
        }
    }
    limits.into_iter().min()
}
