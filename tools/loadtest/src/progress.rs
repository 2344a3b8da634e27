//! The progress bar: its length is the run's planned time, so its position and ETA follow the
//! clock through long steps (a 60 s hold is one step) instead of jumping from step to step.

use std::future::Future;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar for a run planned to take `total`. Drawn on stderr, and only on a terminal: piped
    /// or in CI, only the printed results are seen.
    pub fn new(total: Duration) -> Self {
        let bar = ProgressBar::with_draw_target(Some(millis(total)), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {percent:>3}%  {msg}  (about {eta} left)",
        )
        .expect("progress template")
        .progress_chars("=> ");
        bar.set_style(style);
        Progress { bar }
    }

    /// Runs one step of the run, planned to take `planned`, with `label` on the bar. The bar
    /// moves with the clock during the step (stopping short of the step's end if it runs
    /// long), and is put at the step's end when it finishes.
    pub async fn step<T>(
        &self,
        label: impl Into<String>,
        planned: Duration,
        work: impl Future<Output = T>,
    ) -> T {
        self.bar.set_message(label.into());
        let start = self.bar.position();
        let end = start + millis(planned);
        let started = Instant::now();
        let ticking = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let along = start + millis(started.elapsed());
                self.bar.set_position(along.min(end.saturating_sub(1)));
            }
        };
        let out = tokio::select! {
            out = work => out,
            _ = ticking => unreachable!("the ticker never ends"),
        };
        self.bar.set_position(end);
        out
    }

    /// Prints `text` (to stdout) above the bar.
    pub fn print(&self, text: &str) {
        self.bar.suspend(|| println!("{text}"));
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}
