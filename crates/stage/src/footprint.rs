//! Up-front memory checks: a size a user typed (a width of 10⁸, a batch of 10¹¹) is refused
//! with its estimate before anything is allocated, instead of failing deep inside libtorch.

/// Physical memory of this machine in bytes (MemTotal), if it can be read.
pub fn total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's peak resident memory (VmHWM) in bytes, if it can be read.
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes of the files under `dir` (0 when it does not exist).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

pub fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

/// Ok when `needed` bytes fit in `available`; else a message naming both.
pub fn check_fits(needed: f64, available: u64, what: &str) -> Result<(), String> {
    if needed <= available as f64 {
        Ok(())
    } else {
        Err(format!(
            "{what} needs about {}, more than the {} this device has; make it smaller",
            gib(needed),
            gib(available as f64)
        ))
    }
}
