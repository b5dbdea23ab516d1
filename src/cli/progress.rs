//! Progress display: an indicatif bar on a terminal, plain lines otherwise.

use std::io::IsTerminal;

use convlab::pipeline::Reporter;
use convlab::run::EpochMetrics;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    tty: bool,
    batches: usize,
    epoch: usize,
    epochs: usize,
}

impl Progress {
    pub fn new() -> Self {
        Progress {
            bar: None,
            tty: std::io::stdout().is_terminal(),
            batches: 0,
            epoch: 0,
            epochs: 0,
        }
    }
}

impl Reporter for Progress {
    fn message(&mut self, text: &str) {
        match &self.bar {
            Some(b) => b.println(text),
            None => println!("{text}"),
        }
    }

    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize) {
        self.batches = batches;
        self.epoch = epoch;
        self.epochs = epochs;
        if self.tty {
            let bar = ProgressBar::new(batches as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{epoch}/{epochs}"));
            self.bar = Some(bar);
        }
    }

    fn batch(&mut self, done: usize, loss: f32, images_per_sec: f64) {
        match &self.bar {
            Some(b) => {
                b.set_position(done as u64);
                b.set_message(format!("loss {loss:.4} {images_per_sec:.0} img/s"));
            }
            None => {
                // Plain output: a line at each quarter of the epoch, not one per batch.
                let q = (self.batches / 4).max(1);
                if done.is_multiple_of(q) && done < self.batches {
                    println!(
                        "epoch {}/{} batch {done}/{} loss {loss:.4} {images_per_sec:.0} img/s",
                        self.epoch, self.epochs, self.batches
                    );
                }
            }
        }
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        println!(
            "epoch {:>3}/{}  train loss {:.4} top1 {:6.2}%  val loss {:.4} top1 {:6.2}% top5 {:6.2}%  \
             lr {:.5}  {:.0} img/s  {:.1} s",
            m.epoch,
            self.epochs,
            m.train_loss,
            100.0 * m.train_top1,
            m.val_loss,
            100.0 * m.val_top1,
            100.0 * m.val_top5,
            m.lr,
            m.images_per_sec,
            m.seconds
        );
    }
}
