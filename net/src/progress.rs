//! Progress of long loads (a slice arriving, layers loading, a model opening): an
//! `indicatif` bar when stderr is a terminal, and otherwise plain log lines (at the start,
//! every quarter and the end), so logs collected by systemd or docker stay readable.
//!
//! All bars of a process share one `MultiProgress`, so a coordinator streaming three slices
//! at once (or the demo, which runs a coordinator and its workers in one process) draws
//! them one under the other instead of over each other.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;

fn multi() -> &'static MultiProgress {
    static MULTI: OnceLock<MultiProgress> = OnceLock::new();
    MULTI.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
}

/// Whether bars are drawn (stderr is a terminal and `NO_PROGRESS` is unset).
pub fn bars_enabled() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_PROGRESS").is_none()
}

/// One load in progress.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    done: u64,
    logged_quarter: u64,
    started: Instant,
}

impl Progress {
    /// A load of `total` bytes.
    pub fn bytes(label: impl Into<String>, total: u64) -> Self {
        let label = label.into();
        let bar = bars_enabled().then(|| {
            let bar = multi().add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:<34} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(label.clone());
            bar
        });
        if bar.is_none() {
            info!("{label}: 0 of {total} bytes");
        }
        Progress {
            bar,
            label,
            total,
            done: 0,
            logged_quarter: 0,
            started: Instant::now(),
        }
    }

    /// Work of unknown size: a spinner with the time it has taken.
    pub fn spinner(label: impl Into<String>) -> Self {
        let label = label.into();
        let bar = bars_enabled().then(|| {
            let bar = multi().add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar.set_message(label.clone());
            bar
        });
        if bar.is_none() {
            info!("{label}…");
        }
        Progress {
            bar,
            label,
            total: 0,
            done: 0,
            logged_quarter: 0,
            started: Instant::now(),
        }
    }

    /// `n` more bytes done.
    pub fn advance(&mut self, n: u64) {
        self.done += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.done);
        } else if let Some(quarter) = (self.done * 4).checked_div(self.total) {
            let quarter = quarter.min(4);
            if quarter > self.logged_quarter && quarter < 4 {
                self.logged_quarter = quarter;
                info!(
                    "{}: {} of {} bytes ({}%)",
                    self.label,
                    self.done,
                    self.total,
                    quarter * 25
                );
            }
        }
    }

    /// Done: the bar stays, with what happened.
    pub fn finish(self, outcome: &str) {
        let secs = self.started.elapsed().as_secs_f64();
        match &self.bar {
            Some(bar) => {
                bar.disable_steady_tick();
                bar.finish_with_message(format!("{}: {outcome} in {secs:.1}s", self.label));
            }
            None => info!("{}: {outcome} in {secs:.1}s", self.label),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // An abandoned load (an error) leaves no half-drawn bar behind.
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

/// A stderr writer for log lines that lifts the bars out of the way while it writes, so a
/// log line never lands in the middle of a bar (`tracing_subscriber::fmt().with_writer(||
/// LogWriter)`).
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if bars_enabled() {
            multi().suspend(|| std::io::stderr().write_all(buf))?;
        } else {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}
