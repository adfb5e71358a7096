//! Progress on stderr: durations as `1h02m03s`, and the PPO run's bar and per-step message.

/// The progress message for each step: throughput and ETA over this session's steps.
pub(crate) struct Pace {
    steps: u64,
    started: std::time::Instant,
    first_step: u64,
    tokens: usize,
    /// Seconds left, estimated after the last step.
    pub(crate) eta_s: f64,
}

impl Pace {
    pub(crate) fn new(steps: u64, first_step: u64) -> Self {
        Self {
            steps,
            started: std::time::Instant::now(),
            first_step,
            tokens: 0,
            eta_s: f64::NAN,
        }
    }

    /// `score S reward R kl K beta B T tok/s elapsed E eta A` after report `r`.
    pub(crate) fn message(&mut self, r: &tandem_actors::StepReport) -> String {
        self.tokens += r.tokens_generated;
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = (r.step + 1).saturating_sub(self.first_step).max(1);
        let left = self.steps.saturating_sub(r.step + 1);
        let eta = elapsed / done as f64 * left as f64;
        self.eta_s = eta;
        format!(
            "score {:.3} reward {:.3} kl {:.3} beta {:.4} {:.0} tok/s elapsed {} eta {}",
            r.stats.score_mean,
            r.stats.reward_mean,
            r.stats.kl,
            r.stats.beta,
            self.tokens as f64 / elapsed.max(1e-9),
            hms(elapsed),
            hms(eta)
        )
    }
}

/// `1h02m03s`, `2m03s` or `3s`.
pub fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

pub(crate) fn progress_bar(steps: u64, from: u64) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(steps);
    b.set_position(from);
    b.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] step {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b
}

#[cfg(test)]
mod tests {
    use super::hms;

    #[test]
    fn times_read_like_the_run_progress_line() {
        assert_eq!(hms(3.2), "3s");
        assert_eq!(hms(123.0), "2m03s");
        assert_eq!(hms(3723.0), "1h02m03s");
    }
}
