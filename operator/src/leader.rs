//! Leader election through a `coordination.k8s.io` Lease, so that of
//! several operator replicas exactly one acts.
//!
//! Guarantees: a replica acts only while it holds an unexpired lease it
//! renewed itself; taking or renewing the lease is a compare-and-swap on
//! the Lease's `resourceVersion`, so two replicas can never both succeed.
//! Assumptions: clocks of the replicas agree to well within the lease
//! duration (as for client-go's leader election). Caveats: a leader that
//! stops renewing keeps acting until its own view of the lease expires, and
//! renews at a third of the duration so that this never overlaps a new
//! leader's term.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};

/// What a replica should do about the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No valid holder: take the lease.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds an unexpired lease.
    Standby {
        /// The holder.
        holder: String,
    },
}

/// Decides from the lease as read (`None` if absent).
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = lease else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.clone().unwrap_or_default();
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    let renewed = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0);
    match renewed {
        Some(at) if at + duration > now => Decision::Standby { holder },
        _ => Decision::Acquire,
    }
}

/// Settings of the election.
#[derive(Clone, Debug)]
pub struct Election {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Lease duration.
    pub duration: Duration,
}

fn lease_spec(
    me: &str,
    duration: Duration,
    now: Timestamp,
    previous: Option<&LeaseSpec>,
) -> LeaseSpec {
    let same_holder = previous.and_then(|p| p.holder_identity.as_deref()) == Some(me);
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(duration.as_secs() as i32),
        acquire_time: if same_holder {
            previous.and_then(|p| p.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if same_holder {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

/// One round: read the lease and take or renew it if due. Returns whether
/// this replica is leader afterwards.
pub async fn round(api: &Api<Lease>, election: &Election) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&election.name).await?;
    let spec = current.as_ref().and_then(|l| l.spec.as_ref());
    match decide(spec, &election.identity, now) {
        Decision::Standby { .. } => Ok(false),
        Decision::Acquire | Decision::Renew => {
            let next = lease_spec(&election.identity, election.duration, now, spec);
            let result = match current {
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(election.name.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(next),
                    };
                    api.create(&PostParams::default(), &lease).await.map(|_| ())
                }
                Some(mut lease) => {
                    // Replace carries the resourceVersion we read: a
                    // concurrent writer makes this fail with 409.
                    lease.spec = Some(next);
                    api.replace(&election.name, &PostParams::default(), &lease)
                        .await
                        .map(|_| ())
                }
            };
            match result {
                Ok(()) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Runs the election forever, keeping `leader` up to date.
pub async fn run(client: kube::Client, election: Election, leader: Arc<AtomicBool>) {
    let api: Api<Lease> = Api::namespaced(client, &election.namespace);
    let period = election.duration / 3;
    loop {
        let is_leader = match round(&api, &election).await {
            Ok(is_leader) => is_leader,
            Err(e) => {
                tracing::warn!(error = %e, "leader election round failed");
                false
            }
        };
        if leader.swap(is_leader, Ordering::AcqRel) != is_leader {
            tracing::info!(identity = %election.identity, is_leader, "leadership changed");
        }
        tokio::time::sleep(period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(by: &str, renewed: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(by.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed)),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn only_an_expired_or_empty_lease_is_taken() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&held("a", now)), "a", now), Decision::Renew);
        assert_eq!(
            decide(Some(&held("b", now)), "a", now),
            Decision::Standby { holder: "b".into() }
        );
        let stale = now - SignedDuration::from_secs(16);
        assert_eq!(decide(Some(&held("b", stale)), "a", now), Decision::Acquire);
        assert_eq!(
            decide(Some(&LeaseSpec::default()), "a", now),
            Decision::Acquire
        );
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_keeps_acquire_time() {
        let t0 = Timestamp::now();
        let first = lease_spec("a", Duration::from_secs(15), t0, None);
        assert_eq!(first.lease_transitions, Some(1));
        let t1 = t0 + SignedDuration::from_secs(5);
        let renewed = lease_spec("a", Duration::from_secs(15), t1, Some(&first));
        assert_eq!(renewed.acquire_time, first.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(t1)));
        assert_eq!(renewed.lease_transitions, Some(1));
        let taken = lease_spec("b", Duration::from_secs(15), t1, Some(&renewed));
        assert_eq!(taken.lease_transitions, Some(2));
    }
}
