//! Taking a model out of service without losing a request: once draining,
//! the pipeline admits no new request for it (it forwards them to a peer
//! or refuses them as retryable); the requests in flight finish, and those
//! still running when the drain timeout ends are told so with an OpenAI
//! error event instead of a cut connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How often a drain looks at the requests in flight.
const POLL: Duration = Duration::from_millis(20);
/// How long aborted requests get to send their error event and end.
const ABORT_GRACE: Duration = Duration::from_secs(2);

/// One model's drain state, shared by every copy of the model (a policy
/// change keeps it).
#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    in_flight: Arc<AtomicUsize>,
    abort: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            in_flight: Arc::default(),
            abort: watch::channel(false).0,
        }
    }
}

/// Held by a request in flight; the count drops with it.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a drain did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Drained {
    /// Requests in flight when it began.
    pub in_flight: usize,
    /// Requests still running at the timeout, ended with an error event.
    pub aborted: usize,
}

impl Drain {
    /// Whether new requests are turned away.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Counts a request in flight until the guard drops.
    pub fn enter(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.in_flight.clone())
    }

    /// A receiver that turns true when requests in flight must end.
    pub fn aborted(&self) -> watch::Receiver<bool> {
        self.abort.subscribe()
    }

    /// Stops admitting new requests (at once; [`Self::run`] does too).
    pub fn begin(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Stops admitting, waits up to `timeout` for the requests in flight,
    /// then aborts those left and waits briefly for them to end.
    pub async fn run(&self, timeout: Duration) -> Drained {
        self.begin();
        let in_flight = self.in_flight();
        let deadline = Instant::now() + timeout;
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
        let aborted = self.in_flight();
        if aborted > 0 {
            self.abort.send_replace(true);
            let grace = Instant::now() + ABORT_GRACE;
            while self.in_flight() > 0 && Instant::now() < grace {
                tokio::time::sleep(POLL).await;
            }
        }
        Drained { in_flight, aborted }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_drain_waits_for_requests_that_finish_in_time() {
        let drain = Arc::new(Drain::default());
        let guard = drain.enter();
        let d = drain.clone();
        let run = tokio::spawn(async move { d.run(Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(drain.is_draining());
        assert!(!run.is_finished(), "the drain must wait for the request");
        drop(guard);
        let drained = run.await.unwrap();
        assert_eq!(
            drained,
            Drained {
                in_flight: 1,
                aborted: 0
            }
        );
        assert!(!*drain.aborted().borrow());
    }

    #[tokio::test]
    async fn requests_past_the_timeout_are_aborted() {
        let drain = Arc::new(Drain::default());
        let guard = drain.enter();
        let mut aborted = drain.aborted();
        // A request that ends as soon as it is told to.
        let request = tokio::spawn(async move {
            aborted.wait_for(|a| *a).await.unwrap();
            drop(guard);
        });
        let started = Instant::now();
        let drained = drain.run(Duration::from_millis(200)).await;
        assert_eq!(drained.aborted, 1);
        assert!(started.elapsed() >= Duration::from_millis(200));
        request.await.unwrap();
        assert_eq!(drain.in_flight(), 0);
    }
}
