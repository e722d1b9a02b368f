//! Kubernetes taint and toleration semantics, as placement applies them to
//! Model replicas (the rules the scheduler and the taint manager apply to
//! pods):
//!
//! * `NoSchedule` keeps new replicas off a node and never moves one that
//!   is there; a cordoned node (`spec.unschedulable`) counts as the taint
//!   `node.kubernetes.io/unschedulable:NoSchedule`;
//! * `PreferNoSchedule` is a soft preference: a new replica goes there only
//!   when no other node fits;
//! * `NoExecute` moves replicas off unless tolerated; a toleration with
//!   `tolerationSeconds` keeps the replica until that long after the
//!   taint's `timeAdded` (the smallest such bound of the matching
//!   tolerations wins; a matching toleration without one keeps it forever);
//!   new replicas avoid a node they could only stay on for a while;
//! * every Model gets the default tolerations pods get from the
//!   DefaultTolerationSeconds admission plugin — `not-ready` and
//!   `unreachable` `NoExecute` for 300 s — unless it tolerates those taints
//!   itself.

use k8s_openapi::api::core::v1::{Taint, Toleration};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// Taint of a node whose Ready condition is False.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
/// Taint of a node whose Ready condition is Unknown (no kubelet heartbeat).
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// Taint standing for a cordoned node.
pub const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";
/// How long the default tolerations keep a replica on a not-ready or
/// unreachable node.
pub const DEFAULT_TOLERATION_SECONDS: i64 = 300;

/// Whether `toleration` matches `taint` (key, operator, value, effect).
pub fn matches(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let op = toleration.operator.as_deref().unwrap_or("Equal");
    let key_ok = match (toleration.key.as_deref(), op) {
        (None | Some(""), "Exists") => true,
        (Some(k), "Exists") => k == taint.key,
        (Some(k), _) => {
            k == taint.key
                && toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
        }
        (None, _) => false,
    };
    effect_ok && key_ok
}

/// Whether any of `tolerations` matches `taint`.
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| matches(t, taint))
}

fn taint(key: &str, effect: &str) -> Taint {
    Taint {
        key: key.into(),
        effect: effect.into(),
        ..Taint::default()
    }
}

/// `tolerations` plus the default `not-ready` / `unreachable` `NoExecute`
/// tolerations for whichever of the two they do not already tolerate.
pub fn with_defaults(tolerations: &[Toleration]) -> Vec<Toleration> {
    let mut out = tolerations.to_vec();
    for key in [NOT_READY, UNREACHABLE] {
        if !tolerates(tolerations, &taint(key, "NoExecute")) {
            out.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some("NoExecute".into()),
                toleration_seconds: Some(DEFAULT_TOLERATION_SECONDS),
                value: None,
            });
        }
    }
    out
}

/// A node's taints with cordoning as the taint it stands for.
pub fn effective_taints(taints: &[Taint], unschedulable: bool) -> Vec<Taint> {
    let mut out = taints.to_vec();
    if unschedulable && !out.iter().any(|t| t.key == UNSCHEDULABLE) {
        out.push(taint(UNSCHEDULABLE, "NoSchedule"));
    }
    out
}

/// When a replica on a node with `taints` must leave: `None` if never,
/// `Some(t)` at `t` (at or before `now`: at once).
pub fn eviction_time(
    tolerations: &[Toleration],
    taints: &[Taint],
    now: Timestamp,
) -> Option<Timestamp> {
    taints
        .iter()
        .filter(|t| t.effect == "NoExecute")
        .filter_map(|t| {
            let matching: Vec<&Toleration> =
                tolerations.iter().filter(|tol| matches(tol, t)).collect();
            if matching.is_empty() {
                return Some(now);
            }
            if matching.iter().any(|tol| tol.toleration_seconds.is_none()) {
                return None;
            }
            let secs = matching
                .iter()
                .filter_map(|tol| tol.toleration_seconds)
                .min()
                .unwrap_or(0)
                .max(0);
            // A taint without timeAdded counts from now: it is never late.
            let added = t.time_added.as_ref().map_or(now, |time| time.0);
            Some(
                added
                    .saturating_add(SignedDuration::from_secs(secs))
                    .unwrap_or(added),
            )
        })
        .min()
}

/// Why a new replica may not go on a node with `taints`, if it may not:
/// an untolerated `NoSchedule` or `NoExecute` taint, or a `NoExecute` taint
/// tolerated only for a while.
pub fn blocks_new(tolerations: &[Toleration], taints: &[Taint]) -> Option<String> {
    taints.iter().find_map(|t| match t.effect.as_str() {
        "NoSchedule" if !tolerates(tolerations, t) => Some(format!(
            "taint {}:{} that is not tolerated",
            t.key, t.effect
        )),
        "NoExecute" => {
            let matching: Vec<&Toleration> =
                tolerations.iter().filter(|tol| matches(tol, t)).collect();
            if matching.is_empty() {
                Some(format!(
                    "taint {}:{} that is not tolerated",
                    t.key, t.effect
                ))
            } else if matching.iter().all(|tol| tol.toleration_seconds.is_some()) {
                Some(format!(
                    "taint {}:{} that is tolerated only for a while",
                    t.key, t.effect
                ))
            } else {
                None
            }
        }
        _ => None,
    })
}

/// Untolerated `PreferNoSchedule` taints: new replicas go to nodes with
/// fewer first.
pub fn soft_penalty(tolerations: &[Toleration], taints: &[Taint]) -> usize {
    taints
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule" && !tolerates(tolerations, t))
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use proptest::prelude::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn noexec(key: &str, added: Option<i64>) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoExecute".into(),
            time_added: added.map(|s| Time(at(s))),
            value: None,
        }
    }

    fn tol(key: &str, effect: Option<&str>, secs: Option<i64>) -> Toleration {
        Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: effect.map(Into::into),
            toleration_seconds: secs,
            value: None,
        }
    }

    #[test]
    fn no_schedule_blocks_new_replicas_only() {
        let taints = [taint("gpu", "NoSchedule")];
        assert!(blocks_new(&[], &taints).unwrap().contains("gpu:NoSchedule"));
        assert_eq!(
            eviction_time(&[], &taints, at(0)),
            None,
            "never moves a replica"
        );
        assert_eq!(blocks_new(&[tol("gpu", None, None)], &taints), None);
    }

    #[test]
    fn cordon_is_an_unschedulable_no_schedule_taint() {
        let taints = effective_taints(&[], true);
        assert_eq!(taints, vec![taint(UNSCHEDULABLE, "NoSchedule")]);
        assert!(blocks_new(&with_defaults(&[]), &taints).is_some());
        assert_eq!(eviction_time(&with_defaults(&[]), &taints, at(0)), None);
        assert!(effective_taints(&[], false).is_empty());
        assert_eq!(effective_taints(&taints, true).len(), 1, "not added twice");
    }

    #[test]
    fn prefer_no_schedule_is_a_penalty_not_a_block() {
        let taints = [
            taint("spot", "PreferNoSchedule"),
            taint("x", "PreferNoSchedule"),
        ];
        assert_eq!(blocks_new(&[], &taints), None);
        assert_eq!(soft_penalty(&[], &taints), 2);
        assert_eq!(soft_penalty(&[tol("spot", None, None)], &taints), 1);
    }

    #[test]
    fn no_execute_moves_replicas_unless_tolerated_and_honours_seconds() {
        let now = at(1000);
        let t = [noexec("maintenance", Some(900))];
        assert_eq!(
            eviction_time(&[], &t, now),
            Some(now),
            "untolerated: at once"
        );
        assert_eq!(
            eviction_time(&[tol("maintenance", Some("NoExecute"), None)], &t, now),
            None
        );
        // Tolerated for 300 s from timeAdded (900): leaves at 1200.
        let limited = [tol("maintenance", Some("NoExecute"), Some(300))];
        assert_eq!(eviction_time(&limited, &t, now), Some(at(1200)));
        let late = [tol("maintenance", None, Some(60))];
        assert!(eviction_time(&late, &t, now).unwrap() <= now, "expired");
        // The smallest bound of the matching tolerations wins.
        let both = [limited[0].clone(), tol("maintenance", None, Some(30))];
        assert_eq!(eviction_time(&both, &t, now), Some(at(930)));
        // Without timeAdded the bound counts from now.
        let untimed = [noexec("maintenance", None)];
        assert_eq!(eviction_time(&limited, &untimed, now), Some(at(1300)));
        assert!(
            blocks_new(&limited, &t)
                .unwrap()
                .contains("only for a while")
        );
    }

    #[test]
    fn default_tolerations_keep_replicas_300_s_on_unreachable_nodes() {
        let defaults = with_defaults(&[]);
        assert_eq!(defaults.len(), 2);
        let now = at(100);
        let t = [noexec(UNREACHABLE, Some(0))];
        assert_eq!(eviction_time(&defaults, &t, now), Some(at(300)));
        assert_eq!(
            eviction_time(&defaults, &[noexec(NOT_READY, Some(0))], now),
            Some(at(300))
        );
        // The node lifecycle controller's NoSchedule twin never moves one.
        let soft = [taint(UNREACHABLE, "NoSchedule")];
        assert_eq!(eviction_time(&defaults, &soft, now), None);
        // A Model's own toleration replaces the default for that key.
        let own = with_defaults(&[tol(UNREACHABLE, Some("NoExecute"), Some(30))]);
        assert_eq!(own.len(), 2);
        assert_eq!(eviction_time(&own, &t, now), Some(at(30)));
        let forever = with_defaults(&[tol(UNREACHABLE, None, None)]);
        assert_eq!(eviction_time(&forever, &t, now), None);
    }

    proptest! {
        /// A NoSchedule or PreferNoSchedule taint never moves a replica,
        /// whatever the tolerations; a NoExecute one never moves it before
        /// the bound of a matching toleration.
        #[test]
        fn only_no_execute_moves_and_never_early(
            effect in prop::sample::select(vec!["NoSchedule", "PreferNoSchedule", "NoExecute"]),
            secs in prop::option::of(0i64..10_000),
            added in 0i64..10_000,
            now in 0i64..20_000,
            tolerated in any::<bool>(),
        ) {
            let t = Taint { key: "k".into(), effect: effect.into(), time_added: Some(Time(at(added))), value: None };
            let tols = if tolerated { vec![tol("k", None, secs)] } else { vec![] };
            let when = eviction_time(&tols, std::slice::from_ref(&t), at(now));
            match effect {
                "NoExecute" if !tolerated => prop_assert_eq!(when, Some(at(now))),
                "NoExecute" => match secs {
                    None => prop_assert_eq!(when, None),
                    Some(s) => prop_assert_eq!(when, Some(at(added + s))),
                },
                _ => prop_assert_eq!(when, None),
            }
            let blocked = blocks_new(&tols, std::slice::from_ref(&t)).is_some();
            let expect_block = match effect {
                "NoSchedule" => !tolerated,
                "NoExecute" => !tolerated || secs.is_some(),
                _ => false,
            };
            prop_assert_eq!(blocked, expect_block);
        }
    }
}
