//! The bounded data plane between stages.
//!
//! ractor mailboxes are unbounded, so trajectories never travel in actor messages: they travel
//! through these channels, whose capacity comes from the config. A producer facing a full
//! channel waits (back-pressure) and the time it waits is recorded; the depth of every channel
//! is a gauge. Waiting happens on tokio's blocking pool, never on a tokio worker and never on
//! a device thread, so a stalled stage neither starves the async runtime nor idles a device
//! that other actors share.
//!
//! Shutdown: when every [`StageSender`] is dropped, receivers drain what is buffered and then
//! get `None`; when every receiver is dropped, `send` hands the item back as an error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

/// Per-channel counters shared by both ends.
#[derive(Debug)]
pub struct ChannelStats {
    pub name: &'static str,
    pub capacity: usize,
    blocked_ns: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

impl ChannelStats {
    /// Total time producers spent waiting on a full channel.
    pub fn blocked(&self) -> Duration {
        Duration::from_nanos(self.blocked_ns.load(Ordering::Relaxed))
    }

    /// Items in the channel now (sent and not yet received). Reading it does not keep the
    /// channel open, unlike holding an end.
    pub fn depth(&self) -> usize {
        self.sent
            .load(Ordering::Relaxed)
            .saturating_sub(self.received.load(Ordering::Relaxed)) as usize
    }
}

pub struct StageSender<T> {
    tx: Sender<T>,
    stats: Arc<ChannelStats>,
}

pub struct StageReceiver<T> {
    rx: Receiver<T>,
    stats: Arc<ChannelStats>,
}

impl<T> Clone for StageSender<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            stats: self.stats.clone(),
        }
    }
}

impl<T> Clone for StageReceiver<T> {
    fn clone(&self) -> Self {
        Self {
            rx: self.rx.clone(),
            stats: self.stats.clone(),
        }
    }
}

/// A bounded channel named `name` holding at most `capacity` items (capacity 0 is a rendezvous).
pub fn stage_channel<T>(name: &'static str, capacity: usize) -> (StageSender<T>, StageReceiver<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let stats = Arc::new(ChannelStats {
        name,
        capacity,
        blocked_ns: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
    metrics::gauge!("tandem_channel_capacity", "channel" => name).set(capacity as f64);
    (
        StageSender {
            tx,
            stats: stats.clone(),
        },
        StageReceiver { rx, stats },
    )
}

impl<T: Send + 'static> StageSender<T> {
    /// Sends, waiting while the channel is full. Returns the time spent blocked, or the item
    /// back if every receiver is gone.
    pub async fn send(&self, item: T) -> Result<Duration, T> {
        let item = match self.tx.try_send(item) {
            Ok(()) => {
                self.after_send(Duration::ZERO);
                return Ok(Duration::ZERO);
            }
            Err(crossbeam_channel::TrySendError::Disconnected(item)) => return Err(item),
            Err(crossbeam_channel::TrySendError::Full(item)) => item,
        };
        let tx = self.tx.clone();
        let start = Instant::now();
        let res = tokio::task::spawn_blocking(move || tx.send(item).map_err(|e| e.0)).await;
        let waited = start.elapsed();
        match res {
            Ok(Ok(())) => {
                self.after_send(waited);
                Ok(waited)
            }
            Ok(Err(item)) => Err(item),
            Err(join) => panic!("blocking send task failed: {join}"),
        }
    }

    /// Blocking send for code running on its own thread (tests, feeders).
    pub fn send_blocking(&self, item: T) -> Result<Duration, T> {
        let start = Instant::now();
        self.tx.send(item).map_err(|e| e.0)?;
        let waited = start.elapsed();
        self.after_send(waited);
        Ok(waited)
    }

    fn after_send(&self, waited: Duration) {
        self.stats
            .blocked_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("tandem_channel_depth", "channel" => self.stats.name).set(self.tx.len() as f64);
        if !waited.is_zero() {
            metrics::counter!("tandem_channel_blocked_microseconds", "channel" => self.stats.name)
                .increment(waited.as_micros() as u64);
        }
    }

    pub fn stats(&self) -> &Arc<ChannelStats> {
        &self.stats
    }

    pub fn len(&self) -> usize {
        self.tx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

impl<T: Send + 'static> StageReceiver<T> {
    /// Receives the next item, waiting while the channel is empty; `None` once every sender is
    /// gone and the channel is drained.
    pub async fn recv(&self) -> Option<T> {
        if let Ok(item) = self.rx.try_recv() {
            self.after_recv();
            return Some(item);
        }
        let rx = self.rx.clone();
        let item = tokio::task::spawn_blocking(move || rx.recv().ok()).await.ok().flatten();
        if item.is_some() {
            self.after_recv();
        }
        item
    }

    fn after_recv(&self) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("tandem_channel_depth", "channel" => self.stats.name).set(self.rx.len() as f64);
    }

    pub fn stats(&self) -> &Arc<ChannelStats> {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_channel_makes_the_producer_wait() {
        let (tx, rx) = stage_channel::<u32>("test", 2);
        assert_eq!(tx.send(1).await.unwrap(), Duration::ZERO);
        assert_eq!(tx.send(2).await.unwrap(), Duration::ZERO);
        assert_eq!(tx.len(), 2);
        let producer = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(3).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            !producer.is_finished(),
            "third send must wait while the channel is full"
        );
        assert_eq!(rx.recv().await, Some(1));
        let waited = producer.await.unwrap();
        assert!(waited >= Duration::from_millis(100), "waited {waited:?}");
        assert!(tx.stats().blocked() >= Duration::from_millis(100));
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        drop(tx);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn send_to_a_closed_channel_returns_the_item() {
        let (tx, rx) = stage_channel::<String>("test", 1);
        drop(rx);
        assert_eq!(tx.send("kept".into()).await.unwrap_err(), "kept");
    }
}
