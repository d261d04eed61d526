//! What the machine's energy counters say: a running total in microjoules that a stage
//! reads before and after each batched forward, so that each step can be charged what it
//! cost.
//!
//! - Linux: RAPL through powercap (`/sys/class/powercap/intel-rapl:*`, Intel and AMD), the
//!   `package-N` zones and their `dram` subzones, summed. `core` and `uncore` are inside a
//!   package and `psys` covers the whole platform, so they are left out (no double count);
//!   `intel-rapl-mmio` reads the same package counter another way and is left out too.
//!   Zones are matched by `name`, never by index. Each counter wraps at its
//!   `max_energy_range_uj`; a read that went backwards is a wrap.
//! - macOS: `powermetrics` (root only), its plist samples' CPU, GPU and ANE energy,
//!   integrated on a thread (see [`PowermetricsSample`]).
//! - NVIDIA (the `nvml` feature, on with `cuda`): NVML's total energy of the worker's own
//!   GPU, in mJ. A CUDA worker without it has no meter: the CPU package's counter would
//!   miss what the GPU spends.
//!
//! The counters measure the whole package (or GPU): another process working at the same
//! time is charged too, and so is another worker on the same machine.
//!
//! Where none is readable the meter says why, and the stage reports no energy rather than
//! an estimate: `energy_uj` stays unset and the coordinator says "not available".

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A source of energy readings, or why there is none.
pub struct EnergyMeter {
    source: Source,
    description: String,
}

enum Source {
    None,
    Powercap(Mutex<Powercap>),
    /// A running total kept by a sampling thread (powermetrics).
    Total(Arc<RunningTotal>),
    #[cfg(feature = "nvml")]
    Nvml(Box<Mutex<nvml::Gpu>>),
}

impl std::fmt::Debug for EnergyMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

/// What "not available" starts with: the coordinator and the CLI show it as it is.
pub const NOT_AVAILABLE: &str = "not available";

impl EnergyMeter {
    /// The machine's meter: for a slice on CUDA GPU `cuda`, NVML's counter of that GPU
    /// (or none: see the module doc); otherwise RAPL through powercap under
    /// `powercap_root` (normally `/sys/class/powercap`), else powermetrics on macOS, else
    /// none, saying why.
    pub fn open(powercap_root: &Path, cuda: Option<u32>) -> Self {
        if let Some(index) = cuda {
            #[cfg(feature = "nvml")]
            return match nvml::Gpu::open(index) {
                Ok(g) => EnergyMeter {
                    description: g.describe(),
                    source: Source::Nvml(Box::new(Mutex::new(g))),
                },
                Err(e) => EnergyMeter::none(format!("NVML: {e}")),
            };
            #[cfg(not(feature = "nvml"))]
            return EnergyMeter::none(format!(
                "NVML: this build has no nvml feature to read GPU {index} (build with --features cuda)"
            ));
        }
        let mut why = Vec::new();
        match Powercap::open(powercap_root) {
            Ok(p) => {
                return EnergyMeter {
                    description: p.describe(),
                    source: Source::Powercap(Mutex::new(p)),
                }
            }
            Err(e) => why.push(format!("powercap: {e}")),
        }
        if cfg!(target_os = "macos") {
            match powermetrics::start() {
                Ok(total) => {
                    return EnergyMeter {
                        source: Source::Total(total),
                        description: "powermetrics (CPU + GPU + ANE)".into(),
                    }
                }
                Err(e) => why.push(format!("powermetrics: {e}")),
            }
        }
        EnergyMeter::none(why.join("; "))
    }

    /// No meter, for `why`.
    pub fn none(why: impl Into<String>) -> Self {
        EnergyMeter {
            source: Source::None,
            description: format!("{NOT_AVAILABLE}: {}", why.into()),
        }
    }

    /// What it reads (`powercap: package-0 + dram`), or `not available: <why>`.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Whether it reads anything.
    pub fn available(&self) -> bool {
        !matches!(self.source, Source::None)
    }

    /// The running total, in microjoules; None without a meter or when a read failed.
    pub fn read(&self) -> Option<u64> {
        match &self.source {
            Source::None => None,
            Source::Powercap(p) => p.lock().unwrap_or_else(|e| e.into_inner()).read(),
            Source::Total(t) => t.read(),
            #[cfg(feature = "nvml")]
            Source::Nvml(g) => g.lock().unwrap_or_else(|e| e.into_inner()).read(),
        }
    }
}

/// Why powercap cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum PowercapError {
    /// No RAPL zone (no such directory, a VM, a container that masks it).
    #[error("no RAPL zones under {0}")]
    NoZones(PathBuf),
    /// A zone's counter cannot be read (since Linux 5.10 `energy_uj` is root's only).
    #[error("cannot read {path}: {source} (energy_uj is readable by root only since Linux 5.10: run the worker as root, or grant read access with a udev rule)")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file held something other than a number.
    #[error("{path} holds {text:?}, not a number of microjoules")]
    NotANumber {
        /// The file.
        path: PathBuf,
        /// What it held.
        text: String,
    },
}

/// One RAPL zone's counter.
#[derive(Debug)]
struct Zone {
    name: String,
    energy: PathBuf,
    /// Where its counter wraps (0 if unknown: then a backwards read counts nothing).
    range: u64,
    last: u64,
}

/// RAPL through powercap: the package and DRAM zones, each with its wraps unwound.
#[derive(Debug)]
pub struct Powercap {
    zones: Vec<Zone>,
    total: u64,
}

fn read_number(path: &Path) -> Result<u64, PowercapError> {
    let text = std::fs::read_to_string(path).map_err(|source| PowercapError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    text.trim().parse().map_err(|_| PowercapError::NotANumber {
        path: path.to_path_buf(),
        text: text.trim().chars().take(40).collect(),
    })
}

impl Powercap {
    /// The package and DRAM zones under `root` (`/sys/class/powercap`), each read once.
    pub fn open(root: &Path) -> Result<Self, PowercapError> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .map_err(|_| PowercapError::NoZones(root.to_path_buf()))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    // `intel-rapl:<hex>` and `intel-rapl:<hex>:<hex>`: not the control
                    // type's own directory, not `intel-rapl-mmio:*`.
                    .is_some_and(|n| n.starts_with("intel-rapl:"))
            })
            .collect();
        dirs.sort();
        let mut zones = Vec::new();
        for dir in dirs {
            let Ok(name) = std::fs::read_to_string(dir.join("name")) else {
                continue;
            };
            let name = name.trim().to_string();
            if !(name.starts_with("package-") || name == "dram") {
                continue;
            }
            let energy = dir.join("energy_uj");
            let last = read_number(&energy)?;
            let range = read_number(&dir.join("max_energy_range_uj")).unwrap_or(0);
            zones.push(Zone {
                name,
                energy,
                range,
                last,
            });
        }
        if zones.is_empty() {
            return Err(PowercapError::NoZones(root.to_path_buf()));
        }
        Ok(Powercap { zones, total: 0 })
    }

    /// `powercap: package-0 + dram + ...`.
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.zones.iter().map(|z| z.name.as_str()).collect();
        format!("powercap: {}", names.join(" + "))
    }

    /// Microjoules since it was opened, every zone summed; None when a zone could not be
    /// read this time.
    pub fn read(&mut self) -> Option<u64> {
        for zone in &mut self.zones {
            let now = read_number(&zone.energy).ok()?;
            let spent = if now >= zone.last {
                now - zone.last
            } else if zone.range > 0 {
                // It wrapped: what was left to the top, and what came after.
                zone.range.saturating_sub(zone.last) + now
            } else {
                // Where it wraps is unknown: count nothing rather than guess.
                0
            };
            zone.last = now;
            self.total += spent;
        }
        Some(self.total)
    }
}

/// The share of `spent` microjoules that `rows` of `total_rows` positions cost.
pub fn share(spent: u64, rows: usize, total_rows: usize) -> u64 {
    if total_rows == 0 {
        return 0;
    }
    (u128::from(spent) * rows as u128 / total_rows as u128) as u64
}

/// One sample of `powermetrics -f plist`: what the CPU, GPU and ANE used over it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowermetricsSample {
    /// Its length, nanoseconds.
    pub elapsed_ns: u64,
    /// Energy over it, millijoules.
    pub millijoules: f64,
}

impl PowermetricsSample {
    /// Reads one plist sample. Energy is `processor.{cpu,gpu,ane}_energy` (mJ) where
    /// present, else `processor.combined_power` (mW) over `elapsed_ns`.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        let value = plist::Value::from_reader(std::io::Cursor::new(bytes)).ok()?;
        let sample = value.as_dictionary()?;
        let elapsed_ns = sample.get("elapsed_ns")?.as_unsigned_integer()?;
        let processor = sample.get("processor")?.as_dictionary()?;
        let number = |key: &str| {
            processor.get(key).and_then(|v| {
                v.as_real()
                    .or_else(|| v.as_unsigned_integer().map(|u| u as f64))
                    .or_else(|| v.as_signed_integer().map(|i| i as f64))
            })
        };
        let parts: Vec<f64> = ["cpu_energy", "gpu_energy", "ane_energy"]
            .iter()
            .filter_map(|k| number(k))
            .collect();
        let millijoules = if parts.is_empty() {
            number("combined_power")? * elapsed_ns as f64 / 1e9
        } else {
            parts.iter().sum()
        };
        Some(PowermetricsSample {
            elapsed_ns,
            millijoules,
        })
    }
}

/// A running total in microjoules that a sampling thread adds to, and which reads as
/// nothing once the thread has stopped (its source died: the total no longer moves).
#[derive(Debug, Default)]
pub struct RunningTotal {
    microjoules: AtomicU64,
    stopped: std::sync::atomic::AtomicBool,
}

impl RunningTotal {
    fn add(&self, microjoules: u64) {
        self.microjoules.fetch_add(microjoules, Ordering::Relaxed);
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    fn read(&self) -> Option<u64> {
        (!self.stopped.load(Ordering::Relaxed)).then(|| self.microjoules.load(Ordering::Relaxed))
    }
}

/// `powermetrics` as a child process whose samples a thread adds up. It samples every
/// 100 ms, so a step is charged whole samples or none: the sum over an answer of a second
/// or more is what it measures, not a single step.
mod powermetrics {
    use std::io::Read;
    use std::sync::Arc;

    use super::{PowermetricsSample, RunningTotal};

    /// Starts it (root only); the running total.
    pub fn start() -> Result<Arc<RunningTotal>, String> {
        if !is_root() {
            return Err("it needs root (run the worker with sudo); IOReport is not read".into());
        }
        let mut child = std::process::Command::new("powermetrics")
            .args([
                "--samplers",
                "cpu_power,gpu_power,ane_power",
                "-i",
                "100",
                "-f",
                "plist",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start it: {e}"))?;
        let mut out = child.stdout.take().ok_or("it has no output")?;
        let total = Arc::new(RunningTotal::default());
        let sink = total.clone();
        std::thread::Builder::new()
            .name("powermetrics".into())
            .spawn(move || {
                let _child = child;
                let mut pending = Vec::new();
                let mut buf = [0u8; 8192];
                // Samples are separated by NUL bytes.
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.iter().position(|&b| b == 0) {
                        if let Some(s) = PowermetricsSample::parse(&pending[..end]) {
                            sink.add((s.millijoules * 1000.0) as u64);
                        }
                        pending.drain(..=end);
                    }
                }
                tracing::warn!("powermetrics stopped: energy is not available from now on");
                sink.stop();
            })
            .map_err(|e| format!("cannot start its reader: {e}"))?;
        Ok(total)
    }

    /// Whether this process runs as root (`id -u`: the standard library cannot say, and
    /// this crate has no unsafe code to ask libc).
    fn is_root() -> bool {
        std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    }
}

#[cfg(feature = "nvml")]
mod nvml {
    /// One GPU's energy counter.
    pub struct Gpu {
        nvml: nvml_wrapper::Nvml,
        index: u32,
        first: u64,
    }

    impl Gpu {
        pub fn open(index: u32) -> Result<Self, String> {
            let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
            let mut gpu = Gpu {
                nvml,
                index,
                first: 0,
            };
            gpu.first = gpu.millijoules().map_err(|e| {
                format!("GPU {index} does not report its energy ({e}; NVML needs Volta or newer)")
            })?;
            Ok(gpu)
        }

        fn millijoules(&self) -> Result<u64, nvml_wrapper::error::NvmlError> {
            self.nvml
                .device_by_index(self.index)?
                .total_energy_consumption()
        }

        pub fn describe(&self) -> String {
            format!("NVML: GPU {}", self.index)
        }

        pub fn read(&mut self) -> Option<u64> {
            Some(self.millijoules().ok()?.saturating_sub(self.first) * 1000)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded tree (tests/fixtures/powercap-xeon: a 2-socket Xeon with package and
    /// DRAM zones, core/psys/mmio beside them), copied so that the test can move its
    /// counters.
    fn recorded_tree() -> tempfile::TempDir {
        let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/powercap-xeon");
        let dir = tempfile::tempdir().unwrap();
        for zone in std::fs::read_dir(&from).unwrap() {
            let zone = zone.unwrap();
            if !zone.file_type().unwrap().is_dir() {
                continue;
            }
            let to = dir.path().join(zone.file_name());
            std::fs::create_dir(&to).unwrap();
            for file in std::fs::read_dir(zone.path()).unwrap() {
                let file = file.unwrap();
                std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
            }
        }
        dir
    }

    fn set(root: &Path, zone: &str, microjoules: u64) {
        std::fs::write(
            root.join(zone).join("energy_uj"),
            format!("{microjoules}\n"),
        )
        .unwrap();
    }

    fn get(root: &Path, zone: &str) -> u64 {
        read_number(&root.join(zone).join("energy_uj")).unwrap()
    }

    #[test]
    fn the_recorded_tree_reads_packages_and_dram_only_and_unwinds_wraps() {
        let tree = recorded_tree();
        let root = tree.path();
        let mut p = Powercap::open(root).unwrap();
        assert_eq!(
            p.describe(),
            "powercap: package-0 + dram + package-1 + dram"
        );
        assert_eq!(p.read(), Some(0));
        // 2 J on each package, 0.5 J on each DRAM; core, psys and mmio move too, and are
        // inside what is counted (or the same counter again).
        for (zone, add) in [
            ("intel-rapl:0", 2_000_000),
            ("intel-rapl:0:0", 500_000),
            ("intel-rapl:1", 2_000_000),
            ("intel-rapl:1:0", 500_000),
            ("intel-rapl:0:1", 9_000_000),
            ("intel-rapl-mmio:0", 9_000_000),
        ] {
            set(root, zone, get(root, zone) + add);
        }
        assert_eq!(p.read(), Some(5_000_000));
        // Package 1 wraps: 1 J to the top of its range, then 3 J after it.
        let range = read_number(&root.join("intel-rapl:1/max_energy_range_uj")).unwrap();
        set(root, "intel-rapl:1", range - 1_000_000);
        p.read();
        let before = p.read().unwrap();
        set(root, "intel-rapl:1", 3_000_000);
        assert_eq!(p.read().unwrap() - before, 4_000_000);
    }

    #[test]
    fn a_tree_without_rapl_or_with_an_unreadable_counter_says_why() {
        let empty = tempfile::tempdir().unwrap();
        let e = Powercap::open(empty.path()).unwrap_err().to_string();
        assert!(e.contains("no RAPL zones"), "{e}");
        let e = Powercap::open(&empty.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no RAPL zones"), "{e}");
        // As root every file reads, so an unreadable counter is a directory in its place.
        let tree = recorded_tree();
        let counter = tree.path().join("intel-rapl:0/energy_uj");
        std::fs::remove_file(&counter).unwrap();
        std::fs::create_dir(&counter).unwrap();
        let e = Powercap::open(tree.path()).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("root"), "{e}");
        let tree = recorded_tree();
        std::fs::write(tree.path().join("intel-rapl:1/energy_uj"), "lots").unwrap();
        let e = Powercap::open(tree.path()).unwrap_err().to_string();
        assert!(e.contains("\"lots\", not a number"), "{e}");
        // A meter that cannot open says "not available", and reads nothing.
        let meter = EnergyMeter::open(empty.path(), None);
        assert!(
            meter
                .describe()
                .starts_with("not available: powercap: no RAPL zones"),
            "{}",
            meter.describe()
        );
        assert!(!meter.available());
        assert_eq!(meter.read(), None);
    }

    #[test]
    fn a_running_total_reads_nothing_once_its_source_stopped() {
        let t = RunningTotal::default();
        t.add(5);
        assert_eq!(t.read(), Some(5));
        t.stop();
        assert_eq!(t.read(), None);
    }

    #[test]
    fn a_step_is_charged_its_rows_share() {
        assert_eq!(share(1_000, 1, 4), 250);
        assert_eq!(share(1_000, 4, 4), 1_000);
        assert_eq!(share(u64::MAX, 3, 3), u64::MAX);
        assert_eq!(share(1_000, 1, 0), 0);
    }

    #[test]
    fn a_powermetrics_sample_reads_energy_or_power() {
        let energy = br#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0"><dict>
<key>elapsed_ns</key><integer>500123000</integer>
<key>processor</key><dict>
<key>cpu_energy</key><integer>1830</integer>
<key>gpu_energy</key><integer>95</integer>
<key>ane_energy</key><integer>0</integer>
<key>combined_power</key><real>3850.2</real>
</dict></dict></plist>"#;
        assert_eq!(
            PowermetricsSample::parse(energy),
            Some(PowermetricsSample {
                elapsed_ns: 500_123_000,
                millijoules: 1925.0
            })
        );
        let power = br#"<?xml version="1.0" encoding="UTF-8"?>
<plist version="1.0"><dict>
<key>elapsed_ns</key><integer>1000000000</integer>
<key>processor</key><dict><key>combined_power</key><real>2500.0</real></dict>
</dict></plist>"#;
        assert_eq!(
            PowermetricsSample::parse(power).unwrap().millijoules,
            2500.0
        );
        assert_eq!(
            PowermetricsSample::parse(b"<plist><dict></dict></plist>"),
            None
        );
        assert_eq!(PowermetricsSample::parse(b"garbage"), None);
    }
}
