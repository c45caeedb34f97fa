//! Choosing between all threads and one from measured times, so a worker preempted by another
//! process (a loaded machine) cannot stall every parallel region it joins, without slowing
//! requests on a steady machine.
//!
//! The policy, per input shape: the first passes calibrate (after one warm-up pass each, both
//! modes are timed alternately and the faster median wins). After that only the chosen mode runs;
//! the other is re-timed only when the machine's load changes: when the chosen mode slows down
//! against its calibrated time for several passes in a row (a busy core), or when the 1-minute
//! load average moved since the decision (checked every few seconds; on systems without it, a
//! rare periodic re-check). A steady machine therefore never pays for a probe.
//!
//! One thread chosen while several were asked for is re-checked as well, after 8 passes, then
//! after twice as many each time one thread wins again (up to 1024): the calibration may have met
//! a passing slowdown of the other cores that no load average shows (a virtual machine's stolen
//! time), and such a decision would otherwise stick at one thread's speed. On a really loaded
//! machine this costs a few passes of each re-check, ever more rarely.

use std::collections::HashMap;
use std::time::{Duration, Instant};

type Shape = (usize, usize, usize);

/// Where the policy stands for one input shape.
#[derive(Debug, Clone, Default)]
struct ShapeState {
    passes: u64,
    multi: Vec<f64>,
    single: Vec<f64>,
    /// Timed passes of each mode the current calibration takes.
    samples: usize,
    /// The decision and the chosen mode's calibrated time.
    decided: Option<(bool, f64)>,
    /// Consecutive passes of the chosen mode well above its calibrated time.
    slow: u32,
    /// Load average when decided.
    load: Option<f64>,
    /// Passes since the decision (for the periodic re-checks).
    since: u64,
    /// Passes after which a one-thread decision is re-checked (0 before the first).
    single_period: u64,
}

/// The one-or-all-threads policy (see the module docs).
pub(super) struct Adapt {
    states: HashMap<Shape, ShapeState>,
    current: Shape,
    /// The 1-minute load average, if the system reports one.
    load_source: fn() -> Option<f64>,
    load_period: Duration,
    last_check: Option<Instant>,
}

impl Default for Adapt {
    fn default() -> Self {
        Adapt::with_load_source(load_average)
    }
}

/// Linux's 1-minute load average.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Adapt {
    /// Timed passes per mode in the first calibration and in a re-check.
    const FIRST_SAMPLES: usize = 3;
    const RECHECK_SAMPLES: usize = 2;
    /// The chosen mode is "slow" above this multiple of its calibrated time ...
    const SLOW: f64 = 1.3;
    /// ... for this many passes in a row.
    const SLOW_PASSES: u32 = 4;
    /// A load-average change that triggers a re-check, and how often it is read.
    const LOAD_CHANGE: f64 = 0.75;
    const LOAD_PERIOD: Duration = Duration::from_secs(2);
    /// Passes between re-checks where no load average is available.
    const FALLBACK_PERIOD: u64 = 1024;
    /// Shapes remembered.
    const MAX_SHAPES: usize = 16;
    /// The first and the longest interval between re-checks of a one-thread decision.
    const SINGLE_RECHECK: (u64, u64) = (8, 1024);

    pub(super) fn with_load_source(load_source: fn() -> Option<f64>) -> Self {
        Adapt {
            states: HashMap::new(),
            current: (0, 0, 0),
            load_source,
            load_period: Self::LOAD_PERIOD,
            last_check: None,
        }
    }

    /// Whether the next pass of `shape` runs on one thread (always, with one thread).
    pub(super) fn choose_single(&mut self, threads: usize, shape: Shape) -> bool {
        if threads == 1 {
            return true;
        }
        self.current = shape;
        if self.states.len() >= Self::MAX_SHAPES && !self.states.contains_key(&shape) {
            self.states.clear();
        }
        let recheck = self.load_changed(shape);
        let st = self.states.entry(shape).or_insert_with(|| ShapeState {
            samples: Self::FIRST_SAMPLES,
            ..ShapeState::default()
        });
        let period = match st.single_period {
            0 => Self::SINGLE_RECHECK.0,
            p => p,
        };
        let single_stale = matches!(st.decided, Some((true, _))) && st.since >= period;
        if single_stale {
            st.single_period = (period * 2).min(Self::SINGLE_RECHECK.1);
        }
        if recheck || single_stale {
            st.decided = None;
            st.multi.clear();
            st.single.clear();
            st.samples = Self::RECHECK_SAMPLES;
        }
        st.passes += 1;
        match st.decided {
            Some((single, _)) => single,
            // Calibrating: a warm-up pass of each mode first, then the modes alternate.
            None => st.multi.len() > st.single.len(),
        }
    }

    /// Whether the load average moved since `shape`'s decision (read at most every few seconds).
    fn load_changed(&mut self, shape: Shape) -> bool {
        let Some(st) = self.states.get_mut(&shape) else {
            return false;
        };
        if st.decided.is_none() {
            return false;
        }
        st.since += 1;
        let due = self
            .last_check
            .is_none_or(|t| t.elapsed() >= self.load_period);
        if !due {
            return false;
        }
        self.last_check = Some(Instant::now());
        match ((self.load_source)(), st.load) {
            (Some(now), Some(then)) => (now - then).abs() >= Self::LOAD_CHANGE,
            (Some(_), None) => false,
            (None, _) => st.since >= Self::FALLBACK_PERIOD,
        }
    }

    /// Records the pass just run (`single` as chosen) and its time.
    pub(super) fn record(&mut self, single: bool, seconds: f64) {
        let load = (self.load_source)();
        let Some(st) = self.states.get_mut(&self.current) else {
            return;
        };
        match st.decided {
            None => {
                // The first pass of each mode (buffer allocation, cold caches) is not kept.
                let samples = if single {
                    &mut st.single
                } else {
                    &mut st.multi
                };
                samples.push(seconds);
                let warm = |v: &Vec<f64>| v.len().saturating_sub(1);
                if warm(&st.multi) >= st.samples && warm(&st.single) >= st.samples {
                    let (m, s) = (median(&st.multi[1..]), median(&st.single[1..]));
                    st.decided = Some(if s < m { (true, s) } else { (false, m) });
                    if s >= m {
                        st.single_period = 0;
                    }
                    st.slow = 0;
                    st.since = 0;
                    st.load = load;
                }
            }
            Some((_, reference)) => {
                st.slow = if seconds > Self::SLOW * reference {
                    st.slow + 1
                } else {
                    0
                };
                if st.slow >= Self::SLOW_PASSES {
                    // The chosen mode slowed down for good: the machine's load changed.
                    st.decided = None;
                    st.multi.clear();
                    st.single.clear();
                    st.samples = Self::RECHECK_SAMPLES;
                }
            }
        }
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::Adapt;

    fn no_load() -> Option<f64> {
        None
    }

    /// Runs `passes` passes where each mode takes `time(pass, single)`; returns the modes chosen.
    fn run(adapt: &mut Adapt, passes: usize, time: impl Fn(usize, bool) -> f64) -> Vec<bool> {
        (0..passes)
            .map(|i| {
                let one = adapt.choose_single(2, (1, 224, 224));
                adapt.record(one, time(i, one));
                one
            })
            .collect()
    }

    #[test]
    fn a_steady_machine_pays_for_no_probe_after_calibration() {
        let mut a = Adapt::with_load_source(no_load);
        // Two threads 1.9x faster; the first multi-threaded pass is a slow warm-up.
        let modes = run(&mut a, 1000, |i, one| match (i, one) {
            (0, false) => 24.0,
            (_, true) => 6.0,
            _ => 3.2,
        });
        let single_after = modes[10..].iter().filter(|&&one| one).count();
        assert_eq!(single_after, 0, "{:?}", &modes[..12]);
        // Calibration costs a warm-up and three timed passes of one thread.
        assert!(modes[..10].iter().filter(|&&one| one).count() <= 4);
    }

    #[test]
    fn a_loaded_machine_settles_on_one_thread() {
        let mut a = Adapt::with_load_source(no_load);
        let modes = run(&mut a, 2000, |_, one| if one { 6.0 } else { 9.0 });
        // Re-checks of the decision ever more rarely: a few passes of two threads in 2000.
        let multi = modes[10..].iter().filter(|&&one| !one).count();
        assert!(multi <= 40, "{multi} passes on two threads");
        assert!(modes[1500..].iter().all(|&one| one), "{modes:?}");
    }

    #[test]
    fn a_passing_slowdown_during_calibration_does_not_stick() {
        let mut a = Adapt::with_load_source(no_load);
        // The other core is busy (stolen) for the first 12 passes, calibration included.
        let modes = run(&mut a, 200, |i, one| match (one, i < 12) {
            (true, _) => 6.0,
            (false, true) => 9.0,
            (false, false) => 3.2,
        });
        assert!(modes[8], "one thread chosen while the other core was slow");
        assert!(modes[60..].iter().all(|&one| !one), "{modes:?}");
    }

    static LOAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    fn fake_load() -> Option<f64> {
        Some(f64::from_bits(
            LOAD.load(std::sync::atomic::Ordering::Relaxed),
        ))
    }

    #[test]
    fn load_going_away_brings_the_threads_back() {
        let set = |v: f64| LOAD.store(v.to_bits(), std::sync::atomic::Ordering::Relaxed);
        set(2.0);
        let mut a = Adapt::with_load_source(fake_load);
        a.load_period = std::time::Duration::ZERO;
        // Loaded: two threads slower.
        let modes = run(&mut a, 100, |_, one| if one { 6.0 } else { 9.0 });
        let multi = modes[20..].iter().filter(|&&one| !one).count();
        assert!(multi <= 12, "{modes:?}");
        // The other process ends: the load average falls and two threads are faster again.
        set(0.5);
        let modes = run(&mut a, 100, |_, one| if one { 6.0 } else { 3.2 });
        assert!(modes[20..].iter().all(|&one| !one), "{modes:?}");
    }

    #[test]
    fn load_appearing_switches_to_one_thread_within_a_few_passes() {
        let mut a = Adapt::with_load_source(no_load);
        let modes = run(&mut a, 300, |i, one| match (one, i >= 100) {
            (true, _) => 6.0,
            (false, false) => 3.2,
            (false, true) => 12.0,
        });
        assert!(!modes[50], "two threads before the load");
        // One thread after it, but for the re-checks of that decision.
        let multi = modes[120..].iter().filter(|&&one| !one).count();
        assert!(
            multi <= 12,
            "{multi} of 180 passes on two threads: {modes:?}"
        );
        assert!(modes[290..].iter().all(|&one| one));
    }
}
