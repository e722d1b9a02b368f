//! Coalescing: identical cacheable requests in flight share one
//! generation.
//!
//! Guarantees: every subscriber receives the whole stream in order — a late
//! joiner first gets every event published so far, then live ones (the
//! history is kept for the generation's life, bounded by its own length);
//! dropping a subscription affects no other; the publisher sees how many
//! subscribers remain, so a generation nobody listens to can stop; after
//! `finish` (or the publisher's drop) the key is free, so the next identical
//! request starts fresh or hits the cache. At most `max_subscribers` share
//! one generation; beyond that a request gets its own.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

struct Entry<E> {
    state: Mutex<(Vec<E>, bool)>,
    notify: Notify,
    subscribers: AtomicUsize,
}

/// Generations in flight by key.
pub struct Coalescer<K, E> {
    entries: Arc<Mutex<HashMap<K, Arc<Entry<E>>>>>,
    max_subscribers: usize,
}

/// Feeds one generation's events to its subscribers.
pub struct Publisher<K: Hash + Eq, E> {
    key: K,
    entry: Arc<Entry<E>>,
    entries: Arc<Mutex<HashMap<K, Arc<Entry<E>>>>>,
}

/// One subscriber's view of a generation.
pub struct Subscription<E> {
    entry: Arc<Entry<E>>,
    next: usize,
}

/// The outcome of joining.
pub enum Joined<K: Hash + Eq, E> {
    /// Nobody was generating this: start, and publish.
    Leader(Publisher<K, E>, Subscription<E>),
    /// Someone is: listen.
    Follower(Subscription<E>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<K: Hash + Eq + Clone, E: Clone> Coalescer<K, E> {
    /// A coalescer letting at most `max_subscribers` share a generation.
    pub fn new(max_subscribers: usize) -> Self {
        Self {
            entries: Arc::default(),
            max_subscribers: max_subscribers.max(1),
        }
    }

    fn subscribe(entry: &Arc<Entry<E>>) -> Subscription<E> {
        entry.subscribers.fetch_add(1, Ordering::AcqRel);
        Subscription {
            entry: entry.clone(),
            next: 0,
        }
    }

    /// Joins the generation for `key`, or becomes its leader.
    pub fn join(&self, key: K) -> Joined<K, E> {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get(&key)
            && entry.subscribers.load(Ordering::Acquire) < self.max_subscribers
        {
            return Joined::Follower(Self::subscribe(entry));
        }
        let entry = Arc::new(Entry {
            state: Mutex::new((Vec::new(), false)),
            notify: Notify::new(),
            subscribers: AtomicUsize::new(0),
        });
        // A full entry stays registered for its followers; this generation
        // runs on its own, unregistered.
        if !entries.contains_key(&key) {
            entries.insert(key.clone(), entry.clone());
        }
        let subscription = Self::subscribe(&entry);
        Joined::Leader(
            Publisher {
                key,
                entry,
                entries: self.entries.clone(),
            },
            subscription,
        )
    }

    /// Generations in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.entries).len()
    }
}

impl<K: Hash + Eq, E: Clone> Publisher<K, E> {
    /// Publishes one event.
    pub fn send(&self, event: E) {
        lock(&self.entry.state).0.push(event);
        self.entry.notify.notify_waiters();
    }

    /// Subscribers still listening.
    pub fn subscriber_count(&self) -> usize {
        self.entry.subscribers.load(Ordering::Acquire)
    }
}

impl<K: Hash + Eq, E> Drop for Publisher<K, E> {
    fn drop(&mut self) {
        let mut entries = lock(&self.entries);
        if entries
            .get(&self.key)
            .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
        {
            entries.remove(&self.key);
        }
        drop(entries);
        lock(&self.entry.state).1 = true;
        self.entry.notify.notify_waiters();
    }
}

impl<K: Hash + Eq, E> Publisher<K, E> {
    /// Ends the generation: subscribers drain what is left, new requests
    /// for the key start afresh (the same happens when it is dropped).
    pub fn finish(self) {}
}

impl<E: Clone> Subscription<E> {
    /// The next event, or `None` once the generation ended and every event
    /// was delivered.
    pub async fn next(&mut self) -> Option<E> {
        loop {
            let notified = self.entry.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let state = lock(&self.entry.state);
                if let Some(event) = state.0.get(self.next) {
                    self.next += 1;
                    return Some(event.clone());
                }
                if state.1 {
                    return None;
                }
            }
            notified.await;
        }
    }
}

impl<E> Drop for Subscription<E> {
    fn drop(&mut self) {
        self.entry.subscribers.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn drain(mut s: Subscription<u32>) -> Vec<u32> {
        let mut out = Vec::new();
        while let Some(e) = s.next().await {
            out.push(e);
        }
        out
    }

    #[tokio::test]
    async fn followers_and_late_joiners_see_the_whole_stream() {
        let c: Coalescer<&str, u32> = Coalescer::new(10);
        let Joined::Leader(publisher, lead) = c.join("k") else {
            panic!("first join leads")
        };
        let Joined::Follower(early) = c.join("k") else {
            panic!("second join follows")
        };
        publisher.send(1);
        publisher.send(2);
        let Joined::Follower(late) = c.join("k") else {
            panic!("late join follows")
        };
        let late = tokio::spawn(drain(late));
        publisher.send(3);
        assert_eq!(publisher.subscriber_count(), 3);
        publisher.finish();
        assert_eq!(drain(lead).await, vec![1, 2, 3]);
        assert_eq!(drain(early).await, vec![1, 2, 3]);
        assert_eq!(late.await.unwrap(), vec![1, 2, 3]);
        assert!(
            matches!(c.join("k"), Joined::Leader(..)),
            "finished keys start afresh"
        );
    }

    #[tokio::test]
    async fn dropping_subscribers_is_visible_and_harmless() {
        let c: Coalescer<u8, u32> = Coalescer::new(10);
        let Joined::Leader(publisher, lead) = c.join(1) else {
            panic!()
        };
        let Joined::Follower(other) = c.join(1) else {
            panic!()
        };
        drop(lead);
        publisher.send(7);
        assert_eq!(publisher.subscriber_count(), 1);
        drop(publisher);
        assert_eq!(
            drain(other).await,
            vec![7],
            "a dropped publisher ends the stream"
        );
        assert_eq!(c.in_flight(), 0);
    }

    #[tokio::test]
    async fn exactly_one_leader_among_concurrent_joins_and_a_bound() {
        let c: Arc<Coalescer<u8, u32>> = Arc::new(Coalescer::new(1000));
        let joins: Vec<_> = (0..100).map(|_| c.join(5)).collect();
        let leaders = joins
            .iter()
            .filter(|j| matches!(j, Joined::Leader(..)))
            .count();
        assert_eq!(leaders, 1);
        let small: Coalescer<u8, u32> = Coalescer::new(2);
        let _a = small.join(1);
        let _b = small.join(1);
        assert!(
            matches!(small.join(1), Joined::Leader(..)),
            "a full generation is not joined"
        );
    }
}
