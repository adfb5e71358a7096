//! Ctrl-C (SIGINT) as a stream that loses none.
//!
//! `tokio::signal::ctrl_c()` subscribes afresh on every call, so a signal that arrives while a
//! `select!` loop is between iterations (writing a metrics line, a checkpoint) is never seen, and
//! a run asked to stop would go on. [`Interrupts`] holds one listener for the whole loop: a
//! signal that arrives while nobody waits is kept until the next [`Interrupts::recv`].

use crate::RuntimeError;

/// One SIGINT listener, created before the loop that serves it.
pub struct Interrupts {
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupts {
    /// Installs the listener; must be called inside the tokio runtime.
    pub fn listen() -> Result<Self, RuntimeError> {
        #[cfg(unix)]
        {
            let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| RuntimeError::Other(format!("cannot listen for Ctrl-C: {e}")))?;
            Ok(Self { signal })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the next Ctrl-C, including one that came since the last call. Cancel-safe.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            if self.signal.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_signal_while_nobody_waits_is_kept_for_the_next_recv() {
        let mut interrupts = Interrupts::listen().unwrap();
        let sent = std::process::Command::new("kill")
            .args(["-INT", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        // The signal arrives while no `recv` is pending (as between two `select!` iterations).
        tokio::time::sleep(Duration::from_millis(200)).await;
        tokio::time::timeout(Duration::from_secs(5), interrupts.recv())
            .await
            .expect("the Ctrl-C that came before recv was lost");
    }
}
