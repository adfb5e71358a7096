//! The bounded data plane between stages.
//!
//! How this fits the runtime's ordering, blocking, dropping and restart rules: `docs/semantics.md`.
//!
//! ractor mailboxes are unbounded, so trajectories never travel in actor messages: they travel
//! through these channels, whose capacity comes from the config. A producer facing a full
//! channel waits (back-pressure) and the time it waits is recorded; the depth of every channel
//! is a gauge.
//!
//! Items sit in a crossbeam bounded channel, which threads may block on (`send_blocking`, for
//! loaders on their own threads). Actors await instead: a full `send` or an empty `recv`
//! parks the task on a [`tokio::sync::Notify`] and is woken when the other side makes room or
//! brings an item, so a waiting actor holds no thread, neither a tokio worker nor a device
//! thread. Both are cancel-safe: an item changes hands only inside a non-blocking
//! `try_send`/`try_recv` during a poll, so a cancelled `recv` (a killed actor) takes nothing,
//! and a cancelled `send` keeps its item with the caller, who dropped it.
//!
//! Capacity 0 (a rendezvous) is served as capacity 1: an awaiting receiver is not blocked
//! inside crossbeam, so a direct hand-over could never happen.
//!
//! Shutdown: when every [`StageSender`] is dropped, receivers drain what is buffered and then
//! get `None`; when every receiver is dropped, `send` hands the item back as an error.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use tokio::sync::Notify;

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

/// Wake-ups between the two ends: `item` after a send (and when a sender goes), `room` after a
/// receive (and when a receiver goes). The end counts are kept here rather than read from
/// crossbeam, because a dropped end's crossbeam handle goes only after its `Drop` has woken
/// the other side.
#[derive(Debug)]
struct Wakers {
    item: Notify,
    room: Notify,
    senders: AtomicUsize,
    receivers: AtomicUsize,
}

pub struct StageSender<T> {
    tx: Sender<T>,
    stats: Arc<ChannelStats>,
    wakers: Arc<Wakers>,
}

pub struct StageReceiver<T> {
    rx: Receiver<T>,
    stats: Arc<ChannelStats>,
    wakers: Arc<Wakers>,
}

impl<T> Clone for StageSender<T> {
    fn clone(&self) -> Self {
        self.wakers.senders.fetch_add(1, Ordering::SeqCst);
        Self {
            tx: self.tx.clone(),
            stats: self.stats.clone(),
            wakers: self.wakers.clone(),
        }
    }
}

impl<T> Clone for StageReceiver<T> {
    fn clone(&self) -> Self {
        self.wakers.receivers.fetch_add(1, Ordering::SeqCst);
        Self {
            rx: self.rx.clone(),
            stats: self.stats.clone(),
            wakers: self.wakers.clone(),
        }
    }
}

impl<T> Drop for StageSender<T> {
    fn drop(&mut self) {
        // Receivers waiting for an item re-check: if this was the last sender they end.
        self.wakers.senders.fetch_sub(1, Ordering::SeqCst);
        self.wakers.item.notify_waiters();
    }
}

impl<T> Drop for StageReceiver<T> {
    fn drop(&mut self) {
        self.wakers.receivers.fetch_sub(1, Ordering::SeqCst);
        self.wakers.room.notify_waiters();
    }
}

/// A bounded channel named `name` holding at most `capacity` items (0 is served as 1).
pub fn stage_channel<T>(name: &'static str, capacity: usize) -> (StageSender<T>, StageReceiver<T>) {
    let capacity = capacity.max(1);
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    let stats = Arc::new(ChannelStats {
        name,
        capacity,
        blocked_ns: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
    let wakers = Arc::new(Wakers {
        item: Notify::new(),
        room: Notify::new(),
        senders: AtomicUsize::new(1),
        receivers: AtomicUsize::new(1),
    });
    metrics::gauge!("tandem_channel_capacity", "channel" => name).set(capacity as f64);
    (
        StageSender {
            tx,
            stats: stats.clone(),
            wakers: wakers.clone(),
        },
        StageReceiver { rx, stats, wakers },
    )
}

impl<T: Send + 'static> StageSender<T> {
    /// Sends, waiting while the channel is full. Returns the time spent blocked, or the item
    /// back if every receiver is gone.
    pub async fn send(&self, mut item: T) -> Result<Duration, T> {
        let mut start = None;
        loop {
            // Register for the wake-up before trying, so a receive between the try and the
            // wait is not missed.
            let room = self.wakers.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.tx.try_send(item) {
                Ok(()) => {
                    let waited = start.map_or(Duration::ZERO, |s: Instant| s.elapsed());
                    self.after_send(waited);
                    return Ok(waited);
                }
                Err(TrySendError::Disconnected(back)) => return Err(back),
                Err(TrySendError::Full(back)) if self.wakers.receivers.load(Ordering::SeqCst) == 0 => return Err(back),
                Err(TrySendError::Full(back)) => item = back,
            }
            start.get_or_insert_with(Instant::now);
            room.await;
        }
    }

    /// Blocking send for code running on its own thread (loaders, tests).
    pub fn send_blocking(&self, item: T) -> Result<Duration, T> {
        let start = Instant::now();
        self.tx.send(item).map_err(|e| e.0)?;
        let waited = start.elapsed();
        self.after_send(waited);
        Ok(waited)
    }

    fn after_send(&self, waited: Duration) {
        self.wakers.item.notify_one();
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
    /// gone and the channel is drained. Cancel-safe: dropping the future takes no item.
    pub async fn recv(&self) -> Option<T> {
        loop {
            let item = self.wakers.item.notified();
            tokio::pin!(item);
            item.as_mut().enable();
            match self.rx.try_recv() {
                Ok(got) => {
                    self.after_recv();
                    return Some(got);
                }
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if self.wakers.senders.load(Ordering::SeqCst) == 0 => {
                    // Every sender is gone; what they sent before going is visible now.
                    let last = self.rx.try_recv().ok();
                    if last.is_some() {
                        self.after_recv();
                    }
                    return last;
                }
                Err(TryRecvError::Empty) => {}
            }
            item.await;
        }
    }

    fn after_recv(&self) {
        self.wakers.room.notify_one();
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_recv_takes_nothing() {
        let (tx, rx) = stage_channel::<u32>("test", 4);
        // A receiver that is killed while waiting (its future dropped) ...
        let waiting = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
        assert!(waiting.is_err(), "nothing was sent, so recv must still be waiting");
        // ... leaves the next item to the live receiver.
        tx.send(7).await.unwrap();
        assert_eq!(rx.recv().await, Some(7));
        assert_eq!(rx.stats().depth(), 0);
    }

    #[test]
    fn a_waiting_receiver_holds_no_thread() {
        // One runtime thread and at most one blocking-pool thread. A stage idling on a channel
        // that stays empty must not stop another stage from receiving: waiting parks the task,
        // not a thread.
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_idle_tx, idle_rx) = stage_channel::<u32>("idle", 1);
            let (tx, rx) = stage_channel::<u32>("busy", 1);
            let idle = tokio::spawn(async move { idle_rx.recv().await });
            let busy = tokio::spawn(async move { rx.recv().await });
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(5).await.unwrap();
            let got = tokio::time::timeout(Duration::from_secs(5), busy)
                .await
                .expect("a receiver waiting on another channel held the only thread");
            assert_eq!(got.unwrap(), Some(5));
            assert!(!idle.is_finished());
            idle.abort();
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_producers_and_consumers_lose_and_duplicate_nothing() {
        let (tx, rx) = stage_channel::<u64>("test", 2);
        let mut producers = Vec::new();
        for p in 0..4u64 {
            let tx = tx.clone();
            producers.push(tokio::spawn(async move {
                for i in 0..500 {
                    tx.send(p * 1000 + i).await.unwrap();
                }
            }));
        }
        // One producer on a plain thread, blocking in crossbeam.
        let blocking = {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for i in 0..500 {
                    tx.send_blocking(9000 + i).unwrap();
                }
            })
        };
        drop(tx);
        let mut consumers = Vec::new();
        for _ in 0..3 {
            let rx = rx.clone();
            consumers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(v) = rx.recv().await {
                    got.push(v);
                }
                got
            }));
        }
        drop(rx);
        for p in producers {
            p.await.unwrap();
        }
        blocking.join().unwrap();
        let mut all = Vec::new();
        for c in consumers {
            all.extend(c.await.unwrap());
        }
        all.sort_unstable();
        let mut want: Vec<u64> = (0..4u64).flat_map(|p| (0..500).map(move |i| p * 1000 + i)).collect();
        want.extend(9000..9500);
        want.sort_unstable();
        assert_eq!(all, want);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_sender_gets_its_item_back_when_the_receivers_go() {
        let (tx, rx) = stage_channel::<u32>("test", 1);
        tx.send(1).await.unwrap();
        let sender = tokio::spawn(async move { tx.send(2).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(rx);
        let back = tokio::time::timeout(Duration::from_secs(5), sender)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.unwrap_err(), 2);
    }
}
