//! KV summaries between agents: what each peer's engine holds in its
//! prefix cache (chained block hashes) and how loaded it is, per model.
//!
//! # Transport
//!
//! Each agent answers `GET /v1/weir/kv?model=M&epoch=E&since=S` with a
//! [`KvReport`]: the hashes added and evicted since its sequence number
//! `S` (a delta), or all of them (a snapshot) when `S` is missing, too old
//! for the bounded change log, or of another process lifetime (`E`); plus
//! the load (running and waiting sequences, queued prefill tokens, KV
//! usage) and the block size. Every agent polls each ready peer every
//! [`SummaryOptions::interval`] for each model the peer serves.
//!
//! Why polling over HTTP rather than Redis pub/sub or a push stream: the
//! agents already poll each other and carry the API key for it; a poll
//! needs no broker (routing keeps working where Redis is absent or down),
//! is naturally bounded (one small answer per interval per peer and model,
//! an empty delta when idle), and a missed answer heals itself (the next
//! one carries everything since the last sequence number seen, or a
//! snapshot). A push stream would save one interval of staleness, which
//! the router's own in-flight counts cover.
//!
//! # Bounds
//!
//! A publisher keeps at most [`weir_engine::kv_pool::events::DEFAULT_HASH_CAP`]
//! hashes per model (the most recently stored; older ones are published as
//! removed), so a snapshot and every reader's copy are bounded the same
//! way; a reader also refuses reports with more than [`MAX_HASHES`]. A
//! summary not refreshed within [`SummaryOptions::ttl`] is stale: routing
//! ignores it (and falls back to hashing), and it is dropped.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use weir_engine::kv_pool::{BlockHash, KvChanges};
use weir_engine::stats::EngineStats;

use super::peers::PeerTable;

/// Most hashes a reader accepts in one report (or keeps for one peer's model).
pub const MAX_HASHES: usize = 65_536;

/// A peer engine's load, as published.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KvLoad {
    /// Sequences in the running batch.
    pub running: u64,
    /// Sequences waiting.
    pub waiting: u64,
    /// Prompt tokens not computed yet.
    pub prefill_queued: u64,
    /// Share of KV blocks in use, 0..1.
    pub kv_usage: f64,
}

impl KvLoad {
    /// The load of a local engine now.
    pub fn of(stats: &EngineStats) -> Self {
        let s = stats.snapshot();
        Self {
            running: s.running,
            waiting: s.waiting,
            prefill_queued: s.prefill_queued,
            kv_usage: s.kv_usage,
        }
    }
}

/// One answer of `GET /v1/weir/kv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvReport {
    /// The model.
    pub model: String,
    /// The publisher's lifetime: sequence numbers of another epoch are void.
    pub epoch: u64,
    /// Sequence number of the latest change included.
    pub seq: u64,
    /// Tokens per block.
    pub block_size: usize,
    /// `added` is every hash held (replace the copy), not a delta.
    pub snapshot: bool,
    /// Hashes now held (all of them in a snapshot).
    pub added: Vec<u64>,
    /// Hashes no longer held (empty in a snapshot).
    pub removed: Vec<u64>,
    /// The engine's load now.
    pub load: KvLoad,
}

impl KvReport {
    /// What a reader at (`epoch`, `since`) needs of a local engine's summary.
    pub fn of(model: &str, stats: &EngineStats, epoch: Option<u64>, since: Option<u64>) -> Self {
        let summary = stats.kv_summary();
        let (seq, changes) = summary.since(epoch.unwrap_or(0), since);
        let raw = |v: Vec<BlockHash>| v.into_iter().map(|h| h.0).collect();
        let (snapshot, added, removed) = match changes {
            KvChanges::Snapshot(all) => (true, raw(all), Vec::new()),
            KvChanges::Delta { added, removed } => (false, raw(added), raw(removed)),
        };
        Self {
            model: model.to_owned(),
            epoch: summary.epoch(),
            seq,
            block_size: summary.block_size(),
            snapshot,
            added,
            removed,
            load: KvLoad::of(stats),
        }
    }
}

/// How often summaries are asked for, and how long one stays fresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryOptions {
    /// Between two polls of one peer.
    pub interval: Duration,
    /// A summary not refreshed for this long is ignored and dropped.
    pub ttl: Duration,
}

impl Default for SummaryOptions {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(250),
            ttl: Duration::from_secs(2),
        }
    }
}

/// One peer's summary for one model.
#[derive(Clone, Debug)]
pub struct PeerKv {
    epoch: u64,
    seq: u64,
    /// Tokens per block.
    pub block_size: usize,
    hashes: HashSet<u64>,
    /// Its load when last reported.
    pub load: KvLoad,
    /// Our own requests in flight to it when the report came.
    pub ours_then: usize,
    updated: Instant,
}

impl PeerKv {
    /// Its sequences now, estimated: those of other routers at the last
    /// report (reported minus ours then) plus ours in flight now, so that
    /// our own placements since the report count at once and our finished
    /// ones stop counting.
    pub fn seqs_now(&self, ours_now: usize) -> usize {
        let reported = (self.load.running + self.load.waiting) as usize;
        reported.saturating_sub(self.ours_then) + ours_now
    }
}

impl PeerKv {
    /// Whether the cache holds the block hashed `hash`.
    pub fn holds(&self, hash: BlockHash) -> bool {
        self.hashes.contains(&hash.0)
    }

    /// Hashes held.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }
}

/// Every peer's summaries, by (peer URL, model).
#[derive(Debug, Default)]
pub struct KvSummaries {
    options: SummaryOptions,
    entries: RwLock<HashMap<(String, String), PeerKv>>,
}

impl KvSummaries {
    /// An empty table with these timings.
    pub fn new(options: SummaryOptions) -> Self {
        Self {
            options,
            entries: RwLock::default(),
        }
    }

    /// The timings.
    pub fn options(&self) -> SummaryOptions {
        self.options
    }

    /// Folds `report` from `url` in, sent while `ours` of our requests were
    /// in flight to it. A delta for a copy it does not extend (another
    /// epoch, a gap) is ignored and the copy dropped, so the next poll asks
    /// for a snapshot.
    pub fn merge(&self, url: &str, report: KvReport, ours: usize) {
        let key = (url.to_owned(), report.model.clone());
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if report.added.len() > MAX_HASHES {
            tracing::warn!(peer = %url, hashes = report.added.len(), "KV report too large; ignored");
            entries.remove(&key);
            return;
        }
        let now = Instant::now();
        if report.snapshot {
            let entry = PeerKv {
                epoch: report.epoch,
                seq: report.seq,
                block_size: report.block_size,
                hashes: report.added.into_iter().collect(),
                load: report.load,
                ours_then: ours,
                updated: now,
            };
            entries.insert(key, entry);
            return;
        }
        match entries.get_mut(&key) {
            Some(e) if e.epoch == report.epoch && report.seq >= e.seq => {
                for h in &report.removed {
                    e.hashes.remove(h);
                }
                e.hashes.extend(report.added);
                if e.hashes.len() > MAX_HASHES {
                    entries.remove(&key);
                    return;
                }
                e.seq = report.seq;
                e.block_size = report.block_size;
                e.load = report.load;
                e.ours_then = ours;
                e.updated = now;
            }
            _ => {
                entries.remove(&key);
            }
        }
    }

    /// Where the copy for (`url`, `model`) stands: (epoch, seq), if any.
    pub fn cursor(&self, url: &str, model: &str) -> Option<(u64, u64)> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&(url.to_owned(), model.to_owned()))
            .map(|e| (e.epoch, e.seq))
    }

    /// Runs `f` on the fresh summary of `model` at `url`, if there is one.
    pub fn with_fresh<T>(&self, url: &str, model: &str, f: impl FnOnce(&PeerKv) -> T) -> Option<T> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(&(url.to_owned(), model.to_owned()))
            .filter(|e| e.updated.elapsed() < self.options.ttl)
            .map(f)
    }

    /// Drops stale summaries; returns how many fresh ones remain.
    pub fn expire(&self) -> usize {
        let ttl = self.options.ttl;
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| e.updated.elapsed() < ttl);
        entries.len()
    }

    /// Fresh summaries now.
    pub fn num_fresh(&self) -> usize {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .values()
            .filter(|e| e.updated.elapsed() < self.options.ttl)
            .count()
    }
}

/// Polls every ready peer's KV summary of every model it serves, each
/// [`SummaryOptions::interval`], with the agent's own API key; `fresh` is
/// set to the number of fresh summaries after each round.
pub fn poll(
    peers: Arc<PeerTable>,
    summaries: Arc<KvSummaries>,
    client: reqwest::Client,
    api_key: Option<Arc<str>>,
    fresh: prometheus_client::metrics::gauge::Gauge,
) {
    let options = summaries.options();
    let timeout = options.interval.max(Duration::from_millis(200)) * 2;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(options.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut asks = Vec::new();
            for model in peers.models() {
                for peer in peers.serving(&model) {
                    let (summaries, client, key, peers) = (&summaries, &client, &api_key, &peers);
                    let model = model.clone();
                    asks.push(async move {
                        let (epoch, since) = summaries
                            .cursor(&peer.url, &model)
                            .map_or((None, None), |(e, s)| (Some(e), Some(s)));
                        let mut query = vec![("model", model)];
                        query.extend(epoch.map(|e| ("epoch", e.to_string())));
                        query.extend(since.map(|s| ("since", s.to_string())));
                        let mut ask = client
                            .get(format!("{}/v1/weir/kv", peer.url))
                            .query(&query)
                            .header(super::FORWARDED, "1")
                            .timeout(timeout);
                        if let Some(key) = key {
                            ask = ask.bearer_auth(key);
                        }
                        match ask.send().await {
                            Ok(r) if r.status().is_success() => {
                                let ours = peers.counter(&peer.url).load(Ordering::Acquire);
                                if let Ok(report) = r.json::<KvReport>().await {
                                    summaries.merge(&peer.url, report, ours);
                                }
                            }
                            Ok(r) => {
                                tracing::debug!(peer = %peer.url, status = %r.status(), "no KV summary")
                            }
                            Err(e) => tracing::debug!(peer = %peer.url, error = %e, "no KV summary"),
                        }
                    });
                }
            }
            futures::future::join_all(asks).await;
            fresh.set(summaries.expire() as i64);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(epoch: u64, seq: u64, snapshot: bool, added: &[u64], removed: &[u64]) -> KvReport {
        KvReport {
            model: "m".into(),
            epoch,
            seq,
            block_size: 16,
            snapshot,
            added: added.to_vec(),
            removed: removed.to_vec(),
            load: KvLoad::default(),
        }
    }

    fn holds(t: &KvSummaries, h: u64) -> Option<bool> {
        t.with_fresh("http://p", "m", |p| p.holds(BlockHash(h)))
    }

    #[tokio::test(start_paused = true)]
    async fn snapshots_and_deltas_build_a_copy_that_expires_without_reports() {
        let t = KvSummaries::new(SummaryOptions {
            interval: Duration::from_millis(100),
            ttl: Duration::from_secs(1),
        });
        t.merge("http://p", report(7, 3, true, &[1, 2], &[]), 0);
        t.merge("http://p", report(7, 5, false, &[3], &[1]), 0);
        assert_eq!(holds(&t, 1), Some(false));
        assert_eq!(holds(&t, 2), Some(true));
        assert_eq!(holds(&t, 3), Some(true));
        assert_eq!(t.cursor("http://p", "m"), Some((7, 5)));
        let mut busy = report(7, 5, false, &[], &[]);
        busy.load.running = 3;
        t.merge("http://p", busy, 2);
        let now = |ours| t.with_fresh("http://p", "m", |p| p.seqs_now(ours));
        assert_eq!(now(2), Some(3), "two of the three were ours");
        assert_eq!(now(0), Some(1), "ours finished since");
        assert_eq!(now(5), Some(6));
        tokio::time::advance(Duration::from_millis(900)).await;
        t.merge("http://p", report(7, 5, false, &[], &[]), 0);
        tokio::time::advance(Duration::from_millis(900)).await;
        assert_eq!(holds(&t, 2), Some(true), "refreshed 900 ms ago");
        assert_eq!(t.num_fresh(), 1);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(holds(&t, 2), None, "stale after the TTL");
        assert_eq!(t.num_fresh(), 0);
        assert_eq!(t.expire(), 0);
        assert_eq!(t.cursor("http://p", "m"), None, "dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delta_from_another_epoch_drops_the_copy_until_a_snapshot() {
        let t = KvSummaries::new(SummaryOptions::default());
        t.merge("http://p", report(7, 3, true, &[1], &[]), 0);
        t.merge("http://p", report(8, 4, false, &[2], &[]), 0);
        assert_eq!(holds(&t, 1), None);
        assert_eq!(
            t.cursor("http://p", "m"),
            None,
            "the next poll asks for a snapshot"
        );
        let too_many: Vec<u64> = (0..=MAX_HASHES as u64).collect();
        t.merge("http://p", report(8, 9, true, &too_many, &[]), 0);
        assert_eq!(holds(&t, 1), None, "an oversized report is refused");
    }
}
