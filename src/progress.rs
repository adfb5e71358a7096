//! Progress lines on stderr for long commands that work through a known number of items:
//! `{what} {done}/{total} elapsed 3s eta 5s`, in the manner of `sample` and `train-rm`. A line
//! is printed at most once a second, and always for the last item, so a fast command prints one
//! line and a slow one keeps saying where it is. A quiet `Progress` prints nothing.

use std::time::{Duration, Instant};

use tandem_runtime::progress::hms;

/// How often, at most, a line is printed before the last item.
const EVERY: Duration = Duration::from_secs(1);

pub struct Progress {
    what: &'static str,
    total: usize,
    quiet: bool,
    started: Instant,
    last_line: Option<Instant>,
}

impl Progress {
    /// Progress through `total` items, each line starting with `what` (`exported`, say).
    pub fn new(what: &'static str, total: usize, quiet: bool) -> Progress {
        Progress {
            what,
            total,
            quiet,
            started: Instant::now(),
            last_line: None,
        }
    }

    /// `done` items are finished.
    pub fn update(&mut self, done: usize) {
        if self.quiet {
            return;
        }
        let now = Instant::now();
        let due = self.last_line.is_none_or(|t| now.duration_since(t) >= EVERY);
        if done < self.total && !due {
            return;
        }
        self.last_line = Some(now);
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let eta = elapsed / done.max(1) as f64 * self.total.saturating_sub(done) as f64;
        eprintln!(
            "{} {done}/{} elapsed {} eta {}",
            self.what,
            self.total,
            hms(elapsed),
            hms(eta)
        );
    }
}
