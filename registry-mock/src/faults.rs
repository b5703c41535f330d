//! Fault injection: rules chosen per test, optionally limited to one blob and a count.

use std::time::Duration;

/// What goes wrong.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this HTTP status (e.g. 503) and an empty body.
    Status(u16),
    /// Wait this long before answering.
    Latency(Duration),
    /// Send headers announcing the full length, half the body, then drop the connection.
    DropMidBody,
    /// Flip bits in the body (same length, wrong bytes).
    Corrupt,
    /// Send the body at this many bytes per second (in 64 KiB pieces).
    Throttle(u64),
}

/// A fault applied to blob GETs (of one blob, or all), for the next `times` requests or
/// forever.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    pub fault: Fault,
    pub digest: Option<String>,
    pub times: Option<u32>,
}

impl FaultRule {
    /// Applies to every blob request, forever.
    pub fn always(fault: Fault) -> FaultRule {
        FaultRule {
            fault,
            digest: None,
            times: None,
        }
    }

    /// Applies to the next `n` matching requests.
    pub fn times(fault: Fault, n: u32) -> FaultRule {
        FaultRule {
            fault,
            digest: None,
            times: Some(n),
        }
    }

    /// Limit to one blob.
    pub fn for_blob(mut self, digest: &str) -> FaultRule {
        self.digest = Some(digest.to_string());
        self
    }
}

/// Take the faults that apply to a request for `digest`, consuming counted rules.
pub(crate) fn take(rules: &mut Vec<FaultRule>, digest: &str) -> Vec<Fault> {
    let mut out = Vec::new();
    for r in rules.iter_mut() {
        if r.digest.as_deref().is_some_and(|d| d != digest) {
            continue;
        }
        match r.times {
            Some(0) => continue,
            Some(ref mut n) => *n -= 1,
            None => {}
        }
        out.push(r.fault.clone());
        if matches!(r.fault, Fault::Status(_)) {
            // The response ends here: later rules never got to apply, so keep their counts.
            break;
        }
    }
    rules.retain(|r| r.times != Some(0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_rules_run_out_and_filters_apply() {
        let mut rules = vec![
            FaultRule::times(Fault::Status(503), 2).for_blob("a"),
            FaultRule::always(Fault::Latency(Duration::from_millis(1))),
        ];
        assert_eq!(take(&mut rules, "b"), vec![Fault::Latency(Duration::from_millis(1))]);
        // a status fault ends the response: the latency rule is not consumed with it
        assert_eq!(take(&mut rules, "a"), vec![Fault::Status(503)]);
        assert_eq!(take(&mut rules, "a"), vec![Fault::Status(503)]);
        assert_eq!(take(&mut rules, "a").len(), 1);
        assert_eq!(rules.len(), 1);
    }
}
