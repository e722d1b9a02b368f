//! Ensemble reweighting: shares of traffic move towards members with the
//! better recent figure (latency, time to first token or error rate), by at
//! most `maxStep` per round, never below `minWeight` for a member that is
//! available, and to zero for one that is not.
//!
//! Guarantees: shares sum to 1 (when any member is available); every
//! available member keeps at least `minWeight` when `minWeight × members ≤
//! 1`; a member whose figure got worse while the others' stayed the same
//! never gains share. Members without data keep their share.

use std::collections::BTreeMap;

use weir_crds::ensemble::ReweightObjective;

/// One member's figures over the last interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemberFigures {
    /// Member name.
    pub name: String,
    /// Configured weight.
    pub configured: f64,
    /// Whether it can take traffic.
    pub available: bool,
    /// Requests seen.
    pub requests: f64,
    /// Median latency, seconds.
    pub latency_p50: Option<f64>,
    /// Median time to first token, seconds.
    pub ttft_p50: Option<f64>,
    /// Share of failed requests.
    pub error_rate: Option<f64>,
}

fn score(m: &MemberFigures, objective: ReweightObjective) -> Option<f64> {
    if m.requests <= 0.0 {
        return None;
    }
    match objective {
        ReweightObjective::Latency => m.latency_p50.map(|l| 1.0 / (l + 1e-3)),
        ReweightObjective::Ttft => m.ttft_p50.map(|l| 1.0 / (l + 1e-3)),
        ReweightObjective::ErrorRate => m.error_rate.map(|e| (1.0 - e).max(0.0) + 1e-3),
    }
}

/// Scales `shares` to sum to 1 while holding each available share at or
/// above `floor` (water-filling: floored members are fixed, the rest share
/// what is left in proportion).
fn normalise(shares: &mut BTreeMap<String, f64>, available: &BTreeMap<String, bool>, floor: f64) {
    let live: Vec<String> = shares
        .keys()
        .filter(|k| available.get(*k) == Some(&true))
        .cloned()
        .collect();
    for (k, v) in shares.iter_mut() {
        if available.get(k) != Some(&true) {
            *v = 0.0;
        }
    }
    if live.is_empty() {
        return;
    }
    let floor = if floor * live.len() as f64 > 1.0 {
        1.0 / live.len() as f64
    } else {
        floor
    };
    let mut fixed: Vec<String> = Vec::new();
    loop {
        let free: Vec<&String> = live.iter().filter(|k| !fixed.contains(k)).collect();
        let budget = 1.0 - floor * fixed.len() as f64;
        let total: f64 = free.iter().map(|k| shares[*k].max(0.0)).sum();
        let count = free.len() as f64;
        let scale = |v: f64| {
            if total > 0.0 {
                v.max(0.0) / total * budget
            } else {
                budget / count
            }
        };
        let below: Vec<String> = free
            .iter()
            .filter(|k| scale(shares[**k]) < floor)
            .map(|k| (*k).clone())
            .collect();
        if below.is_empty() {
            for k in free {
                let v = scale(shares[k]);
                shares.insert(k.clone(), v);
            }
            for k in &fixed {
                shares.insert(k.clone(), floor);
            }
            return;
        }
        fixed.extend(below);
    }
}

/// New shares for one round. `previous` holds the shares in effect (empty:
/// the configured weights).
pub fn reweight(
    members: &[MemberFigures],
    objective: ReweightObjective,
    min_weight: f64,
    max_step: f64,
    previous: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let available: BTreeMap<String, bool> = members
        .iter()
        .map(|m| (m.name.clone(), m.available))
        .collect();
    let mut current: BTreeMap<String, f64> = members
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                previous.get(&m.name).copied().unwrap_or(m.configured),
            )
        })
        .collect();
    normalise(&mut current, &available, min_weight);
    // Targets: members with data share the mass they hold now in proportion
    // to configured weight × score; members without data keep theirs.
    let scored: Vec<(&MemberFigures, f64)> = members
        .iter()
        .filter(|m| m.available)
        .filter_map(|m| score(m, objective).map(|s| (m, s)))
        .collect();
    let mass: f64 = scored.iter().map(|(m, _)| current[&m.name]).sum();
    let weight: f64 = scored.iter().map(|(m, s)| m.configured.max(0.0) * s).sum();
    let mut next = current.clone();
    if weight > 0.0 {
        for (m, s) in &scored {
            let target = mass * m.configured.max(0.0) * s / weight;
            let now = current[&m.name];
            next.insert(
                m.name.clone(),
                now + (target - now).clamp(-max_step, max_step),
            );
        }
    }
    normalise(&mut next, &available, min_weight);
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn member(name: &str, latency: f64) -> MemberFigures {
        MemberFigures {
            name: name.into(),
            configured: 1.0,
            available: true,
            requests: 100.0,
            latency_p50: Some(latency),
            ttft_p50: Some(latency / 2.0),
            error_rate: Some(0.0),
        }
    }

    #[test]
    fn a_slow_member_loses_share_step_by_step_down_to_the_floor() {
        let members = [member("fast", 0.1), member("slow", 1.0)];
        let mut shares = BTreeMap::new();
        let mut history = Vec::new();
        for _ in 0..20 {
            shares = reweight(&members, ReweightObjective::Latency, 0.05, 0.1, &shares);
            history.push(shares["slow"]);
        }
        assert!(
            (history[0] - 0.4).abs() < 1e-9,
            "one step of 0.1 from 0.5: {history:?}"
        );
        assert!(history.windows(2).all(|w| w[1] <= w[0] + 1e-12));
        assert!(
            history.last().unwrap() >= &0.05 && *history.last().unwrap() < 0.15,
            "{history:?}"
        );
    }

    #[test]
    fn unavailable_members_get_nothing_and_missing_data_keeps_share() {
        let mut down = member("down", 0.1);
        down.available = false;
        let mut quiet = member("quiet", 0.1);
        quiet.requests = 0.0;
        let shares = reweight(
            &[member("a", 0.2), down, quiet],
            ReweightObjective::Latency,
            0.05,
            0.1,
            &BTreeMap::new(),
        );
        assert_eq!(shares["down"], 0.0);
        assert!((shares["quiet"] - 0.5).abs() < 1e-9, "{shares:?}");
        assert!((shares.values().sum::<f64>() - 1.0).abs() < 1e-9);
    }

    proptest! {
        #[test]
        fn shares_are_a_distribution_with_floors(
            figs in prop::collection::vec((0.01f64..5.0, any::<bool>(), 0.0f64..10.0, 0u32..200), 1..6),
            min_weight in 0.0f64..0.3,
            max_step in 0.01f64..0.5,
        ) {
            let members: Vec<MemberFigures> = figs.iter().enumerate().map(|(i, (lat, avail, w, req))| MemberFigures {
                name: format!("m{i}"), configured: *w, available: *avail, requests: f64::from(*req),
                latency_p50: Some(*lat), ttft_p50: None, error_rate: None,
            }).collect();
            let shares = reweight(&members, ReweightObjective::Latency, min_weight, max_step, &BTreeMap::new());
            let live = members.iter().filter(|m| m.available).count();
            if live > 0 {
                prop_assert!((shares.values().sum::<f64>() - 1.0).abs() < 1e-9);
                let floor = if min_weight * live as f64 > 1.0 { 1.0 / live as f64 } else { min_weight };
                for m in &members {
                    if m.available { prop_assert!(shares[&m.name] >= floor - 1e-9); } else { prop_assert_eq!(shares[&m.name], 0.0); }
                }
            }
            // Making one member slower never raises its share.
            let mut slower = members.clone();
            slower[0].latency_p50 = slower[0].latency_p50.map(|l| l * 3.0);
            let after = reweight(&slower, ReweightObjective::Latency, min_weight, max_step, &BTreeMap::new());
            prop_assert!(after["m0"] <= shares["m0"] + 1e-9);
        }
    }
}
