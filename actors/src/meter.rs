//! Per-actor measurements: what `tandem top`, the Prometheus endpoint and the report show.
//!
//! Every actor owns an [`ActorMeter`] labelled with its kind, id, device and node (`head` for
//! actors of the head process; a worker's name for the head-side proxies of its samplers). It counts messages
//! handled, seconds computing on the device, seconds blocked on a full outbound channel, work
//! items (tokens for rollout actors, scored items for reward, trajectories for value and
//! replay, steps for the learner), the policy version in use and the actor's state. The
//! counters are atomics the runtime samples (busy fraction, rates) and are mirrored into the
//! `metrics` facade as labelled series:
//!
//! | series | type | meaning |
//! |---|---|---|
//! | `tandem_actor_messages_total` | counter | messages handled |
//! | `tandem_actor_handle_seconds` | histogram | time per handled message |
//! | `tandem_actor_busy_seconds_total` | gauge (monotonic) | seconds computing on the device |
//! | `tandem_actor_blocked_seconds_total` | gauge (monotonic) | seconds blocked on a full outbound channel |
//! | `tandem_actor_items_total` | counter | work items (see above) |
//! | `tandem_actor_restarts_total` | counter | restarts by the supervisor |
//! | `tandem_actor_queue_depth` / `_capacity` | gauge | inbound channel depth and capacity |
//! | `tandem_actor_policy_version` | gauge | weights version in use (rollout, value) |
//! | `tandem_actor_state` | gauge | 0 idle, 1 computing, 2 blocked, 3 stopped |
//!
//! The runtime's sampler adds `tandem_actor_busy_fraction`, `tandem_actor_rate` and
//! `tandem_actor_version_lag` per actor once per interval.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What an actor is doing right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ActorState {
    Idle = 0,
    Computing = 1,
    Blocked = 2,
    Stopped = 3,
}

impl ActorState {
    pub fn name(self) -> &'static str {
        match self {
            ActorState::Idle => "idle",
            ActorState::Computing => "computing",
            ActorState::Blocked => "blocked",
            ActorState::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => ActorState::Computing,
            2 => ActorState::Blocked,
            3 => ActorState::Stopped,
            _ => ActorState::Idle,
        }
    }
}

type DepthProbe = Box<dyn Fn() -> usize + Send + Sync>;

pub struct ActorMeter {
    pub kind: &'static str,
    pub name: String,
    pub device: String,
    pub node: String,
    messages: AtomicU64,
    busy_ns: AtomicU64,
    blocked_ns: AtomicU64,
    items: AtomicU64,
    restarts: AtomicU64,
    /// u64::MAX = no weights.
    version: AtomicU64,
    state: AtomicU8,
    inbound: Option<(DepthProbe, usize)>,
}

/// A point-in-time copy of a meter's counters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeterReading {
    pub messages: u64,
    pub busy: Duration,
    pub blocked: Duration,
    pub items: u64,
    pub restarts: u64,
    pub version: Option<u64>,
    pub state: ActorState,
    pub queue_depth: Option<usize>,
    pub queue_capacity: Option<usize>,
}

impl std::fmt::Debug for ActorMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorMeter")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .finish()
    }
}

impl ActorMeter {
    pub fn new(kind: &'static str, name: impl Into<String>, device: impl Into<String>) -> Self {
        Self::on_node(kind, name, device, "head")
    }

    /// A meter for an actor that works on `node` (its series carry `node="..."`).
    pub fn on_node(
        kind: &'static str,
        name: impl Into<String>,
        device: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        let m = Self {
            kind,
            name: name.into(),
            device: device.into(),
            node: node.into(),
            messages: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            blocked_ns: AtomicU64::new(0),
            items: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            version: AtomicU64::new(u64::MAX),
            state: AtomicU8::new(ActorState::Idle as u8),
            inbound: None,
        };
        // Every actor's series exist from the start, zeros included.
        let l = m.labels();
        metrics::counter!("tandem_actor_restarts_total", &l).absolute(0);
        metrics::counter!("tandem_actor_messages_total", &l).absolute(0);
        metrics::gauge!("tandem_actor_state", &l).set(ActorState::Idle as u8 as f64);
        m
    }

    /// Watches the actor's inbound channel (`depth` returns its current length).
    pub fn with_inbound(mut self, depth: impl Fn() -> usize + Send + Sync + 'static, capacity: usize) -> Self {
        metrics::gauge!("tandem_actor_queue_capacity", &self.labels()).set(capacity as f64);
        self.inbound = Some((Box::new(depth), capacity));
        self
    }

    pub fn labels(&self) -> [(&'static str, String); 4] {
        [
            ("kind", self.kind.to_string()),
            ("actor", self.name.clone()),
            ("device", self.device.clone()),
            ("node", self.node.clone()),
        ]
    }

    /// Starts timing one handled message; the time is recorded when the guard drops, on every
    /// return path of a handler.
    pub fn time_handle(self: &Arc<Self>) -> HandleTimer {
        HandleTimer {
            meter: self.clone(),
            start: Instant::now(),
        }
    }

    pub fn handled(&self, took: Duration) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        let l = self.labels();
        metrics::counter!("tandem_actor_messages_total", &l).increment(1);
        metrics::histogram!("tandem_actor_handle_seconds", &l).record(took.as_secs_f64());
    }

    pub fn busy(&self, took: Duration) {
        self.busy_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        metrics::gauge!("tandem_actor_busy_seconds_total", &self.labels()).increment(took.as_secs_f64());
    }

    pub fn blocked(&self, took: Duration) {
        if took.is_zero() {
            return;
        }
        self.blocked_ns.fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        metrics::gauge!("tandem_actor_blocked_seconds_total", &self.labels()).increment(took.as_secs_f64());
    }

    pub fn items(&self, n: u64) {
        self.items.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("tandem_actor_items_total", &self.labels()).increment(n);
    }

    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("tandem_actor_restarts_total", &self.labels()).increment(1);
    }

    pub fn set_version(&self, v: u64) {
        self.version.store(v, Ordering::Relaxed);
        metrics::gauge!("tandem_actor_policy_version", &self.labels()).set(v as f64);
    }

    pub fn set_state(&self, s: ActorState) {
        self.state.store(s as u8, Ordering::Relaxed);
        metrics::gauge!("tandem_actor_state", &self.labels()).set(s as u8 as f64);
    }

    pub fn read(&self) -> MeterReading {
        let depth = self.inbound.as_ref().map(|(f, _)| f());
        if let (Some(d), Some((_, cap))) = (depth, &self.inbound) {
            let l = self.labels();
            metrics::gauge!("tandem_actor_queue_depth", &l).set(d as f64);
            // Again with every reading: a capacity set before a recorder was installed is lost.
            metrics::gauge!("tandem_actor_queue_capacity", &l).set(*cap as f64);
        }
        let v = self.version.load(Ordering::Relaxed);
        MeterReading {
            messages: self.messages.load(Ordering::Relaxed),
            busy: Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed)),
            blocked: Duration::from_nanos(self.blocked_ns.load(Ordering::Relaxed)),
            items: self.items.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
            version: (v != u64::MAX).then_some(v),
            state: ActorState::from_u8(self.state.load(Ordering::Relaxed)),
            queue_depth: depth,
            queue_capacity: self.inbound.as_ref().map(|(_, c)| *c),
        }
    }
}

/// See [`ActorMeter::time_handle`].
pub struct HandleTimer {
    meter: Arc<ActorMeter>,
    start: Instant,
}

impl Drop for HandleTimer {
    fn drop(&mut self) {
        self.meter.handled(self.start.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_accumulate() {
        let m = ActorMeter::new("rollout", "rollout/cpu:0/0", "cpu:0").with_inbound(|| 3, 4);
        m.handled(Duration::from_millis(5));
        m.busy(Duration::from_millis(4));
        m.blocked(Duration::from_millis(2));
        m.items(12);
        m.set_version(7);
        m.set_state(ActorState::Blocked);
        let r = m.read();
        assert_eq!(
            (r.messages, r.items, r.version, r.state),
            (1, 12, Some(7), ActorState::Blocked)
        );
        assert_eq!(
            (r.busy, r.blocked),
            (Duration::from_millis(4), Duration::from_millis(2))
        );
        assert_eq!((r.queue_depth, r.queue_capacity), (Some(3), Some(4)));
    }
}
