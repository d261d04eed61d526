//! Reading this process's and this machine's memory: resident (VmRSS), peak resident
//! (VmHWM) and the machine's total and available memory, from `/proc` on Linux. Other
//! systems report zero where they have no `/proc`; budgets there must be given explicitly.

fn proc_kib(path: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

/// Resident bytes of this process now.
pub fn resident_bytes() -> u64 {
    proc_kib("/proc/self/status", "VmRSS:").unwrap_or(0)
}

/// Peak resident bytes of this process.
pub fn peak_resident_bytes() -> u64 {
    proc_kib("/proc/self/status", "VmHWM:").unwrap_or(0)
}

/// The machine's memory, in bytes.
pub fn total_bytes() -> u64 {
    proc_kib("/proc/meminfo", "MemTotal:").unwrap_or(0)
}

/// Memory the machine can give without swapping, in bytes.
pub fn available_bytes() -> u64 {
    proc_kib("/proc/meminfo", "MemAvailable:").unwrap_or_else(total_bytes)
}

/// The default memory budget: 75% of what is available now, so the machine keeps room
/// for its own work (what Ollama and llama.cpp users expect from a shared desktop).
pub fn default_budget() -> u64 {
    available_bytes() / 4 * 3
}

/// Parses sizes like `12GiB`, `512MiB`, `4G`, `1.5GB`, `1000000`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        _ => return None,
    };
    let bytes = value * mult;
    (bytes.is_finite() && bytes >= 0.0).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("12GiB"), Some(12 << 30));
        assert_eq!(parse_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size("1.5GB"), Some(1_500_000_000));
        assert_eq!(parse_size("42"), Some(42));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn this_process_has_memory() {
        if cfg!(target_os = "linux") {
            // Resident first: other tests' threads may allocate between the two reads, and
            // the peak is never below an earlier resident figure.
            let resident = resident_bytes();
            assert!(resident > 0);
            assert!(peak_resident_bytes() >= resident);
            assert!(total_bytes() > 0);
        }
    }
}
