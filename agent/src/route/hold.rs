//! Holding requests for a model that exists but has no ready replica (a
//! Model scaled to zero, or one whose replica is loading or moving): the
//! agent that received the request keeps it, per model in arrival order,
//! until a replica reports Ready, and then lets the held requests go on in
//! that order. Counted in `weir_requests_held{model_name}`, which the
//! operator collects to scale a Model from zero.
//!
//! Guarantees:
//! - Bounded per model by count ([`HoldLimits::max_held`]: one more is
//!   refused at once) and by time ([`HoldLimits::timeout`], counted from
//!   arrival, also across a release that found no replica after all).
//!   Both refusals are 503 with `Retry-After` and code `model_unavailable`.
//! - A [`Ticket`] leaves its queue when dropped: a client that goes away
//!   while held (its request future is dropped) frees its slot at once.
//! - [`HoldQueues::release`] wakes the held requests of a model oldest
//!   first; a ticket that waits again keeps its place (its arrival number).
//!
//! Assumptions: whoever learns that a model has a ready replica calls
//! `release` (the peer table on every rebuild, model loading here); a
//! release without a replica is harmless (the requests wait again).
//!
//! Caveats: released requests wake in arrival order, but after that they
//! run concurrently, so the replica may see two of them swapped when they
//! are released within microseconds of each other.
//!
//! Written here rather than taken from a crate: it is a few lines over
//! `tokio::sync::oneshot`, and what matters (bounds, order, release on
//! drop, the gauge) is specific to this use.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::api::ApiError;
use crate::metrics::ModelLabel;

/// How long a client is told to wait after a hold is refused.
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// How many requests may be held for one model, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldLimits {
    /// Longest a request is held (zero: refused at once).
    pub timeout: Duration,
    /// Most requests held at once.
    pub max_held: usize,
}

impl Default for HoldLimits {
    /// The Model defaults: 120 s, 64 requests.
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
            max_held: 64,
        }
    }
}

impl HoldLimits {
    /// The limits a Model's replica policy sets.
    pub fn of(policy: &weir_crds::model::ReplicaPolicy) -> Self {
        Self {
            timeout: Duration::from_secs(u64::from(policy.hold_timeout_seconds)),
            max_held: policy.max_held_requests as usize,
        }
    }
}

#[derive(Default)]
struct State {
    /// Arrival number of the next request held.
    next: u64,
    /// Limits of models without their own.
    default: HoldLimits,
    /// Limits per model (cluster mode: from the Model objects).
    limits: BTreeMap<String, HoldLimits>,
    /// Held requests per model, by arrival number: what wakes each.
    queues: BTreeMap<String, BTreeMap<u64, oneshot::Sender<()>>>,
    /// The agent is stopping: nothing more is held.
    closed: bool,
}

impl State {
    fn limits(&self, model: &str) -> HoldLimits {
        self.limits.get(model).copied().unwrap_or(self.default)
    }
}

/// The held requests of every model, and the limits that bound them.
pub struct HoldQueues {
    state: Mutex<State>,
    gauge: Family<ModelLabel, Gauge>,
}

impl HoldQueues {
    /// Queues counted in `gauge`, with the default limits.
    pub fn new(gauge: Family<ModelLabel, Gauge>) -> Self {
        Self {
            state: Mutex::default(),
            gauge,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the limits of models without their own.
    pub fn set_default(&self, limits: HoldLimits) {
        self.state().default = limits;
    }

    /// Sets every model's own limits (replacing the earlier ones).
    pub fn configure(&self, limits: BTreeMap<String, HoldLimits>) {
        self.state().limits = limits;
    }

    /// The limits that apply to `model`.
    pub fn limits(&self, model: &str) -> HoldLimits {
        self.state().limits(model)
    }

    /// Requests held for `model` now.
    pub fn held(&self, model: &str) -> usize {
        self.state().queues.get(model).map_or(0, BTreeMap::len)
    }

    /// Holds a request for `model`, last in its queue; refused at once
    /// when the queue is full or the model's hold timeout is zero.
    pub fn hold(&self, model: &str) -> Result<Ticket<'_>, ApiError> {
        let mut state = self.state();
        let limits = state.limits(model);
        if state.closed {
            return Err(stopping(model));
        }
        let held = state.queues.get(model).map_or(0, BTreeMap::len);
        if limits.timeout.is_zero() || held >= limits.max_held {
            return Err(refusal(format!(
                "model `{model}` has no ready replica and {held} requests are held for it \
                 already (at most {}); retry shortly",
                limits.max_held
            )));
        }
        let seq = state.next;
        state.next += 1;
        let (tx, rx) = oneshot::channel();
        state
            .queues
            .entry(model.to_owned())
            .or_default()
            .insert(seq, tx);
        drop(state);
        self.gauge_of(model).inc();
        Ok(Ticket {
            queues: self,
            model: model.to_owned(),
            seq,
            wake: Some(rx),
            arrived: Instant::now(),
            deadline: Instant::now() + limits.timeout,
        })
    }

    /// Wakes every request held for `model`, oldest first; how many.
    pub fn release(&self, model: &str) -> usize {
        let released = self.state().queues.remove(model).unwrap_or_default();
        let n = released.len();
        // Ascending arrival numbers: the oldest wakes first.
        for (_, wake) in released {
            let _ = wake.send(());
        }
        if n > 0 {
            self.gauge_of(model).dec_by(n as i64);
            tracing::info!(model, released = n, "releasing held requests");
        }
        n
    }

    /// Holds nothing more and releases every held request: the agent is
    /// stopping (its held requests must not outlive the drain). Released
    /// requests that still find no replica are refused.
    pub fn close(&self) -> usize {
        self.state().closed = true;
        self.release_where(|_| true)
    }

    /// Releases the held requests of every model `ready` says has a ready
    /// replica now; how many.
    pub fn release_where(&self, ready: impl Fn(&str) -> bool) -> usize {
        let models: Vec<String> = self.state().queues.keys().cloned().collect();
        models
            .iter()
            .filter(|m| ready(m))
            .map(|m| self.release(m))
            .sum()
    }

    fn gauge_of(&self, model: &str) -> Gauge {
        self.gauge
            .get_or_create(&ModelLabel {
                model_name: model.to_owned(),
            })
            .clone()
    }

    /// Takes `seq` off `model`'s queue if it is still there.
    fn leave(&self, model: &str, seq: u64) {
        let mut state = self.state();
        let Some(queue) = state.queues.get_mut(model) else {
            return;
        };
        let left = queue.remove(&seq).is_some();
        if queue.is_empty() {
            state.queues.remove(model);
        }
        drop(state);
        if left {
            self.gauge_of(model).dec();
        }
    }
}

fn stopping(model: &str) -> ApiError {
    refusal(format!(
        "model `{model}` has no ready replica and this agent is stopping; retry"
    ))
}

fn refusal(message: String) -> ApiError {
    ApiError::ModelUnavailable {
        message,
        retry_after: RETRY_AFTER,
    }
}

/// One held request. Dropping it takes it off its queue.
pub struct Ticket<'a> {
    queues: &'a HoldQueues,
    model: String,
    seq: u64,
    /// Fires at release; `None` once it did (until [`Ticket::wait_again`]).
    wake: Option<oneshot::Receiver<()>>,
    arrived: Instant,
    deadline: Instant,
}

impl Ticket<'_> {
    /// Waits until the model's requests are released, or refuses once the
    /// hold timeout has passed since arrival.
    pub async fn released(&mut self) -> Result<(), ApiError> {
        let Some(wake) = self.wake.as_mut() else {
            return Ok(());
        };
        match tokio::time::timeout_at(self.deadline, wake).await {
            Ok(_) => {
                self.wake = None;
                Ok(())
            }
            Err(_) => {
                self.queues.leave(&self.model, self.seq);
                self.wake = None;
                Err(refusal(format!(
                    "model `{}` has no ready replica: none became ready within the hold \
                     timeout of {:?}; retry shortly",
                    self.model,
                    self.deadline - self.arrived
                )))
            }
        }
    }

    /// Puts a released request back in its queue at its arrival place
    /// (the replica it was released for is gone again); the deadline
    /// stays. Refused once the queues are closed.
    pub fn wait_again(&mut self) -> Result<(), ApiError> {
        let (tx, rx) = oneshot::channel();
        let mut state = self.queues.state();
        if state.closed {
            return Err(stopping(&self.model));
        }
        state
            .queues
            .entry(self.model.clone())
            .or_default()
            .insert(self.seq, tx);
        drop(state);
        self.queues.gauge_of(&self.model).inc();
        self.wake = Some(rx);
        Ok(())
    }

    /// How long the request has been held.
    pub fn waited(&self) -> Duration {
        self.arrived.elapsed()
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.wake.is_some() {
            self.queues.leave(&self.model, self.seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn queues(timeout_secs: u64, max_held: usize) -> (Arc<HoldQueues>, Family<ModelLabel, Gauge>) {
        let gauge = Family::default();
        let q = Arc::new(HoldQueues::new(gauge.clone()));
        q.set_default(HoldLimits {
            timeout: Duration::from_secs(timeout_secs),
            max_held,
        });
        (q, gauge)
    }

    fn gauge(family: &Family<ModelLabel, Gauge>, model: &str) -> i64 {
        family
            .get_or_create(&ModelLabel {
                model_name: model.to_owned(),
            })
            .get()
    }

    /// Holds `n` requests for `model` in tasks that record, in `order`,
    /// their index when released. The current-thread runtime runs the
    /// tasks in spawn order, so task `i` arrives `i`-th.
    async fn hold_n(
        q: &Arc<HoldQueues>,
        model: &'static str,
        n: usize,
        order: &Arc<Mutex<Vec<usize>>>,
    ) -> Vec<tokio::task::JoinHandle<Result<(), ApiError>>> {
        let before = q.held(model);
        let tasks = (0..n)
            .map(|i| {
                let (q, order) = (q.clone(), order.clone());
                tokio::spawn(async move {
                    let mut ticket = q.hold(model)?;
                    ticket.released().await?;
                    order.lock().unwrap().push(i);
                    Ok(())
                })
            })
            .collect();
        while q.held(model) < before + n {
            tokio::task::yield_now().await;
        }
        tasks
    }

    #[tokio::test(start_paused = true)]
    async fn released_in_arrival_order() {
        let (q, g) = queues(60, 10);
        let order = Arc::new(Mutex::new(Vec::new()));
        let tasks = hold_n(&q, "m", 5, &order).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(q.held("m"), 5);
        assert_eq!(gauge(&g, "m"), 5);
        assert_eq!(q.release("other"), 0);
        assert_eq!(q.release_where(|m| m == "m"), 5);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!((q.held("m"), gauge(&g, "m")), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_count_is_refused_at_once() {
        let (q, g) = queues(60, 2);
        let _a = q.hold("m").unwrap();
        let _b = q.hold("m").unwrap();
        let refused = q.hold("m").err().expect("a third is refused");
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.retry_after(), Some(RETRY_AFTER));
        assert_eq!(refused.body()["error"]["code"], "model_unavailable");
        // Another model has its own queue and limits.
        q.configure(BTreeMap::from([(
            "big".to_owned(),
            HoldLimits {
                timeout: Duration::from_secs(1),
                max_held: 3,
            },
        )]));
        let held: Vec<_> = (0..3).map(|_| q.hold("big").unwrap()).collect();
        assert!(q.hold("big").is_err());
        assert_eq!((gauge(&g, "m"), gauge(&g, "big")), (2, 3));
        drop(held);
        assert_eq!(gauge(&g, "big"), 0);
        // A zero timeout holds nothing.
        q.set_default(HoldLimits {
            timeout: Duration::ZERO,
            max_held: 10,
        });
        assert!(q.hold("n").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_timeout_refuses_and_frees_the_slot() {
        let (q, g) = queues(120, 1);
        let started = Instant::now();
        let mut ticket = q.hold("m").unwrap();
        let refused = ticket.released().await.expect_err("nothing releases it");
        assert_eq!(started.elapsed(), Duration::from_secs(120));
        assert_eq!(refused.body()["error"]["code"], "model_unavailable");
        assert!(refused.to_string().contains("120s"), "{refused}");
        assert_eq!((q.held("m"), gauge(&g, "m")), (0, 0));
        drop(ticket);
        assert_eq!(gauge(&g, "m"), 0, "dropping after the timeout counts once");
        // The slot is free again.
        let _again = q.hold("m").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_ticket_leaves_the_queue_at_once() {
        let (q, g) = queues(60, 2);
        let waiting = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut ticket = q.hold("m")?;
                ticket.released().await
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(q.held("m"), 1);
        // The client goes away: its request future (and ticket) is dropped.
        waiting.abort();
        let _ = waiting.await;
        assert_eq!((q.held("m"), gauge(&g, "m")), (0, 0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let tasks = hold_n(&q, "m", 2, &order).await;
        assert_eq!(q.held("m"), 2, "both slots are free for others");
        q.release("m");
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_again_keeps_the_place_and_the_deadline() {
        let (q, g) = queues(10, 5);
        let mut first = q.hold("m").unwrap();
        let mut second = q.hold("m").unwrap();
        assert_eq!(q.release("m"), 2);
        first.released().await.unwrap();
        second.released().await.unwrap();
        // No replica after all: `first` waits again, still ahead of a
        // newcomer that arrived after `second`.
        let third = q.hold("m").unwrap();
        first.wait_again().unwrap();
        assert_eq!(gauge(&g, "m"), 2);
        let seqs: Vec<u64> = q.state().queues["m"].keys().copied().collect();
        assert_eq!(seqs, vec![first.seq, third.seq]);
        assert!(first.seq < second.seq && second.seq < third.seq);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let started = Instant::now();
        assert!(first.released().await.is_err());
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(6),
            "deadline from arrival"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn closing_releases_everything_and_holds_nothing_more() {
        let (q, g) = queues(60, 5);
        let mut a = q.hold("m").unwrap();
        let mut b = q.hold("n").unwrap();
        assert_eq!(q.close(), 2);
        a.released().await.unwrap();
        b.released().await.unwrap();
        assert!(a.wait_again().is_err(), "no replica after all: refused");
        let refused = q.hold("m").err().expect("nothing more is held");
        assert!(refused.to_string().contains("stopping"), "{refused}");
        assert_eq!((gauge(&g, "m"), gauge(&g, "n")), (0, 0));
    }
}
