//! Ctrl-C (SIGINT) and SIGTERM as one stream that loses none.
//!
//! `tokio::signal::ctrl_c()` subscribes afresh on every call, so a signal that arrives while a
//! `select!` loop is between iterations (writing a metrics line, a checkpoint) is never seen, and
//! a run asked to stop would go on. [`Interrupts`] holds one listener per signal for the whole
//! loop: a signal that arrives while nobody waits is kept until the next [`Interrupts::recv`].
//!
//! SIGTERM is what systemd, Docker, Kubernetes and Slurm send to stop a job, so on Unix it is
//! treated exactly as Ctrl-C: the first one asks for a stop at the next step boundary with a
//! checkpoint, a second one (of either kind) stops at once. Once the listeners are installed
//! the process no longer dies of either signal by default; before that (while the models
//! load) it does, which loses nothing because nothing has been trained yet.

use crate::RuntimeError;

/// Which signal [`Interrupts::recv`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// SIGINT (Ctrl-C).
    CtrlC,
    /// SIGTERM (a service manager or scheduler stopping the job).
    Terminate,
}

impl Interrupt {
    /// The signal's name, for log lines.
    pub fn name(self) -> &'static str {
        match self {
            Interrupt::CtrlC => "Ctrl-C",
            Interrupt::Terminate => "SIGTERM",
        }
    }
}

/// One SIGINT and one SIGTERM listener, created before the loop that serves them.
pub struct Interrupts {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Interrupts {
    /// Installs the listeners; must be called inside the tokio runtime.
    pub fn listen() -> Result<Self, RuntimeError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let interrupt = signal(SignalKind::interrupt())
                .map_err(|e| RuntimeError::Signals(format!("cannot listen for Ctrl-C: {e}")))?;
            let terminate = signal(SignalKind::terminate())
                .map_err(|e| RuntimeError::Signals(format!("cannot listen for SIGTERM: {e}")))?;
            Ok(Self { interrupt, terminate })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next Ctrl-C or SIGTERM, including one that came since the last call.
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Interrupt {
        #[cfg(unix)]
        {
            tokio::select! {
                Some(()) = self.interrupt.recv() => Interrupt::CtrlC,
                Some(()) = self.terminate.recv() => Interrupt::Terminate,
                else => std::future::pending().await,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Interrupt::CtrlC
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::Duration;

    // One test sends both signals: the listeners are process-wide, and two tests signalling the
    // same process in parallel would see each other's signals.
    #[tokio::test]
    async fn a_signal_while_nobody_waits_is_kept_for_the_next_recv() {
        let mut interrupts = Interrupts::listen().unwrap();
        for (flag, expected) in [("-INT", Interrupt::CtrlC), ("-TERM", Interrupt::Terminate)] {
            let sent = std::process::Command::new("kill")
                .args([flag, &std::process::id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success());
            // The signal arrives while no `recv` is pending (as between two `select!` iterations).
            tokio::time::sleep(Duration::from_millis(200)).await;
            let got = tokio::time::timeout(Duration::from_secs(5), interrupts.recv())
                .await
                .unwrap_or_else(|_| panic!("the {flag} that came before recv was lost"));
            assert_eq!(got, expected);
        }
    }
}
