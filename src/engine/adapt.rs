//! Choosing between all threads and one from measured times, so a worker preempted by another
//! process (a loaded machine) cannot stall every parallel region it joins, without slowing
//! requests on a steady machine.
//!
//! The policy, per input shape: the first passes calibrate (after one warm-up pass each, both
//! modes are timed alternately and the faster median wins). After that only the chosen mode runs;
//! the other is re-timed only when the machine's load changes: when the CPU time that *other*
//! processes use (steal time of a virtual machine included, this process's own threads excluded)
//! moved by most of a core since the decision (read every few seconds from `/proc`) while it
//! leaves fewer free cores than this engine has threads (before or after), or when the
//! chosen mode stays well above its calibrated time for several passes and at least a second (a
//! busy core that the counters missed; shorter hiccups, such as a virtual machine's brief stolen
//! time, pass without a probe). On systems without `/proc`, a rare periodic re-check. A steady
//! machine therefore never pays for a probe. The 1-minute load average is not used: it counts
//! this process's own threads, so a busy engine moved it by itself and re-probed its own load.
//!
//! One thread chosen while several were asked for is re-checked as well, after 8 passes, then
//! after twice as many each time (up to 1024): the calibration may have met a passing slowdown
//! of the other cores that no counter shows, and such a decision would otherwise stick at one
//! thread's speed. So is all threads chosen while other processes use 0.4 core or more of the
//! cores this engine's threads need: a calibration of a few passes may have met that load's
//! quiet moments, and the load, there since before the decision, would never change to re-check
//! it. The load is read every pass (a clock read) until its first reading, a tenth of a second
//! in, so a load present from the start is known early. On a really loaded machine this costs a
//! few passes of each re-check, ever more rarely; an idle one pays nothing.

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
    /// Consecutive passes of the chosen mode well above its calibrated time, and their seconds.
    slow: u32,
    slow_secs: f64,
    /// Other processes' CPU use (cores) when decided, or the first reading after.
    load: Option<f64>,
    /// Passes since the decision (for the periodic re-checks).
    since: u64,
    /// Passes after which a decision that may not last is re-checked (0 before the first): one
    /// thread, or all threads while other processes contest the cores.
    recheck_period: u64,
}

/// The one-or-all-threads policy (see the module docs).
pub(super) struct Adapt {
    states: HashMap<Shape, ShapeState>,
    current: Shape,
    /// Other processes' CPU use, if the system reports it.
    load_source: LoadSource,
    load_period: Duration,
    last_check: Option<Instant>,
    /// The latest reading of `load_source` (taken at most every `load_period`).
    load: Option<f64>,
    /// Passes timed, and of those the ones run on one thread while several were asked for
    /// (calibration and re-checks, or one thread chosen).
    passes: u64,
    single_passes: u64,
}

/// Where the policy reads the machine's load from.
enum LoadSource {
    OtherProcesses(OtherCpu),
    /// A fixed reading function and count of cores (tests).
    #[cfg(test)]
    Fixed(fn() -> Option<f64>, usize),
}

impl LoadSource {
    fn read(&mut self) -> Option<f64> {
        match self {
            LoadSource::OtherProcesses(cpu) => cpu.read(),
            #[cfg(test)]
            LoadSource::Fixed(f, _) => f(),
        }
    }

    /// The machine's cores, if known.
    fn cores(&self) -> Option<usize> {
        match self {
            LoadSource::OtherProcesses(cpu) => cpu.cores,
            #[cfg(test)]
            LoadSource::Fixed(_, cores) => Some(*cores),
        }
    }
}

impl Default for Adapt {
    fn default() -> Self {
        Adapt::with_load_source(LoadSource::OtherProcesses(OtherCpu::default()))
    }
}

/// CPU time counters: the whole machine's busy time (steal included) and this process's, in
/// clock ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTicks {
    busy: u64,
    own: u64,
}

/// The whole machine's busy ticks from the first line of `/proc/stat` (user, nice, system, irq,
/// softirq and steal; guest time is inside user).
fn machine_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    (fields.next()? == "cpu").then_some(())?;
    let v: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    (v.len() >= 4).then(|| at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// The machine's cores: the `cpuN` lines of `/proc/stat`.
fn machine_cores(stat: &str) -> usize {
    stat.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count()
}

/// This process's user + system ticks from `/proc/self/stat` (fields 14 and 15; the command name
/// before them is in parentheses and may hold spaces or parentheses itself).
fn process_busy(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

/// Cores' worth of CPU time that other processes used between two readings `secs` apart.
fn other_cores(then: CpuTicks, now: CpuTicks, ticks_per_sec: f64, secs: f64) -> f64 {
    let busy = now.busy.saturating_sub(then.busy) as f64;
    let own = now.own.saturating_sub(then.own) as f64;
    ((busy - own) / ticks_per_sec / secs).max(0.0)
}

/// Reads other processes' CPU use since its previous reading.
#[derive(Default)]
struct OtherCpu {
    last: Option<(Instant, CpuTicks)>,
    /// `/proc` could not be read: every later call answers `None` at once.
    missing: bool,
    /// The machine's cores (those the counters cover), once read.
    cores: Option<usize>,
}

impl OtherCpu {
    /// The counters now, and the machine's cores.
    fn ticks() -> Option<(CpuTicks, usize)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let ticks = CpuTicks {
            busy: machine_busy(&stat)?,
            own: process_busy(&std::fs::read_to_string("/proc/self/stat").ok()?)?,
        };
        Some((ticks, machine_cores(&stat)))
    }

    /// Cores used by other processes since the previous call; `None` on the first call, within
    /// 100 ms of the previous one, or where `/proc` is missing.
    fn read(&mut self) -> Option<f64> {
        // Too soon: answered without reading `/proc`, so polling every pass costs a clock read.
        if self.missing
            || self
                .last
                .is_some_and(|(t0, _)| t0.elapsed() < Duration::from_millis(100))
        {
            return None;
        }
        let Some((ticks, cores)) = Self::ticks() else {
            self.missing = true;
            return None;
        };
        self.cores = (cores > 0).then_some(cores);
        let now = (Instant::now(), ticks);
        let Some((t0, then)) = self.last else {
            self.last = Some(now);
            return None;
        };
        let secs = now.0.duration_since(t0).as_secs_f64();
        self.last = Some(now);
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| other_cores(then, now.1, hz as f64, secs))
    }
}

impl Adapt {
    /// Timed passes per mode in the first calibration and in a re-check.
    const FIRST_SAMPLES: usize = 3;
    const RECHECK_SAMPLES: usize = 2;
    /// The chosen mode is "slow" above this multiple of its calibrated time ...
    const SLOW: f64 = 1.3;
    /// ... for this many passes in a row and at least this many seconds.
    const SLOW_PASSES: u32 = 4;
    const SLOW_SECS: f64 = 1.0;
    /// A change of other processes' CPU use (cores) that triggers a re-check where they leave
    /// fewer free cores than the engine has threads (before or after), and how often it is read.
    const LOAD_CHANGE: f64 = 0.75;
    const LOAD_PERIOD: Duration = Duration::from_secs(2);
    /// Other processes' CPU use (cores) from which they contest the cores this engine needs. A
    /// process spinning on one of two cores read 0.57-1.08 beside a two-thread engine (the engine
    /// takes its share); an idle machine reads 0.00-0.05.
    const BUSY: f64 = 0.4;
    /// Passes between re-checks where the CPU counters are not available.
    const FALLBACK_PERIOD: u64 = 1024;
    /// Shapes remembered.
    const MAX_SHAPES: usize = 16;
    /// The first and the longest interval between re-checks of a decision that may not last.
    const RECHECK: (u64, u64) = (8, 1024);

    fn with_load_source(load_source: LoadSource) -> Self {
        Adapt {
            states: HashMap::new(),
            current: (0, 0, 0),
            load_source,
            load_period: Self::LOAD_PERIOD,
            last_check: None,
            load: None,
            passes: 0,
            single_passes: 0,
        }
    }

    /// Passes timed so far, and how many of them ran on one thread while several were asked for.
    pub(super) fn single_share(&self) -> (u64, u64) {
        (self.passes, self.single_passes)
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
        let reading = self.poll_load();
        let recheck = self.load_changed(shape, threads, reading);
        let contested = self.contested_now(threads);
        let st = self.states.entry(shape).or_insert_with(|| ShapeState {
            samples: Self::FIRST_SAMPLES,
            ..ShapeState::default()
        });
        let period = match st.recheck_period {
            0 => Self::RECHECK.0,
            p => p,
        };
        // All threads chosen while other processes contest the cores may have been a lucky
        // calibration (a worker that happened to run): re-checked as one thread is.
        let unsure = matches!(st.decided, Some((single, _)) if single || contested);
        let stale = unsure && st.since >= period;
        if stale {
            st.recheck_period = (period * 2).min(Self::RECHECK.1);
        }
        if recheck || stale {
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

    /// Reads other processes' CPU use when due: every pass until the first reading (so a load
    /// present from the start is known within a fraction of a second), then every few seconds.
    /// Returns the reading taken now, if any.
    fn poll_load(&mut self) -> Option<f64> {
        let due = self.load.is_none()
            || self
                .last_check
                .is_none_or(|t| t.elapsed() >= self.load_period);
        if !due {
            return None;
        }
        self.last_check = Some(Instant::now());
        let reading = self.load_source.read();
        if reading.is_some() {
            self.load = reading;
        }
        reading
    }

    /// Whether, by the latest reading, other processes use [`Self::BUSY`] core or more of the
    /// cores this engine's threads need.
    fn contested_now(&self, threads: usize) -> bool {
        let cores = self.load_source.cores();
        self.load
            .is_some_and(|load| load >= Self::BUSY && contested(cores, load, threads))
    }

    /// Whether other processes' CPU use moved since `shape`'s decision, by `reading` (taken this
    /// pass, if due).
    fn load_changed(&mut self, shape: Shape, threads: usize, reading: Option<f64>) -> bool {
        let cores = self.load_source.cores();
        let contested = |load: f64| contested(cores, load, threads);
        let source_missing = self.load.is_none();
        let Some(st) = self.states.get_mut(&shape) else {
            return false;
        };
        if st.decided.is_none() {
            return false;
        }
        st.since += 1;
        match (reading, st.load) {
            (Some(now), Some(then)) => {
                (now - then).abs() >= Self::LOAD_CHANGE && (contested(now) || contested(then))
            }
            // The first reading after the decision is its baseline.
            (Some(now), None) => {
                st.load = Some(now);
                false
            }
            (None, _) => source_missing && st.since >= Self::FALLBACK_PERIOD,
        }
    }

    /// Records the pass just run on `threads` asked for (`single` as chosen) and its time.
    pub(super) fn record(&mut self, threads: usize, single: bool, seconds: f64) {
        let load = self.load;
        let contested = self.contested_now(threads);
        let Some(st) = self.states.get_mut(&self.current) else {
            return;
        };
        self.passes += 1;
        self.single_passes += u64::from(single);
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
                    if s >= m && !contested {
                        st.recheck_period = 0;
                    }
                    st.slow = 0;
                    st.slow_secs = 0.0;
                    st.since = 0;
                    st.load = load;
                }
            }
            Some((_, reference)) => {
                (st.slow, st.slow_secs) = if seconds > Self::SLOW * reference {
                    (st.slow + 1, st.slow_secs + seconds)
                } else {
                    (0, 0.0)
                };
                if st.slow >= Self::SLOW_PASSES && st.slow_secs >= Self::SLOW_SECS {
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

/// Whether other processes using `load` of the machine's `cores` leave fewer free cores than
/// `threads` (unknown cores: yes).
fn contested(cores: Option<usize>, load: f64, threads: usize) -> bool {
    cores.is_none_or(|cores| load + threads as f64 > cores as f64)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_load() -> Option<f64> {
        None
    }

    /// Runs `passes` passes where each mode takes `time(pass, single)`; returns the modes chosen.
    fn run(adapt: &mut Adapt, passes: usize, time: impl Fn(usize, bool) -> f64) -> Vec<bool> {
        (0..passes)
            .map(|i| {
                let one = adapt.choose_single(2, (1, 224, 224));
                adapt.record(2, one, time(i, one));
                one
            })
            .collect()
    }

    #[test]
    fn a_steady_machine_pays_for_no_probe_after_calibration() {
        let mut a = Adapt::with_load_source(LoadSource::Fixed(no_load, 2));
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
        let mut a = Adapt::with_load_source(LoadSource::Fixed(no_load, 2));
        let modes = run(&mut a, 2000, |_, one| if one { 6.0 } else { 9.0 });
        // Re-checks of the decision ever more rarely: a few passes of two threads in 2000.
        let multi = modes[10..].iter().filter(|&&one| !one).count();
        assert!(multi <= 40, "{multi} passes on two threads");
        assert!(modes[1500..].iter().all(|&one| one), "{modes:?}");
    }

    #[test]
    fn a_passing_slowdown_during_calibration_does_not_stick() {
        let mut a = Adapt::with_load_source(LoadSource::Fixed(no_load, 2));
        // The other core is busy (stolen) for the first 12 passes, calibration included.
        let modes = run(&mut a, 200, |i, one| match (one, i < 12) {
            (true, _) => 6.0,
            (false, true) => 9.0,
            (false, false) => 3.2,
        });
        assert!(modes[8], "one thread chosen while the other core was slow");
        assert!(modes[60..].iter().all(|&one| !one), "{modes:?}");
    }

    use std::sync::atomic::{AtomicU64, Ordering};

    /// A load reading kept in a static, for the `fn` of [`LoadSource::Fixed`].
    fn reading(cell: &AtomicU64) -> Option<f64> {
        Some(f64::from_bits(cell.load(Ordering::Relaxed)))
    }

    fn set_reading(cell: &AtomicU64, load: f64) {
        cell.store(load.to_bits(), Ordering::Relaxed);
    }

    static LOAD: AtomicU64 = AtomicU64::new(0);

    fn fake_load() -> Option<f64> {
        reading(&LOAD)
    }

    #[test]
    fn load_going_away_brings_the_threads_back() {
        let set = |v: f64| set_reading(&LOAD, v);
        set(2.0);
        let mut a = Adapt::with_load_source(LoadSource::Fixed(fake_load, 2));
        a.load_period = std::time::Duration::ZERO;
        // Loaded: two threads slower.
        let modes = run(&mut a, 100, |_, one| if one { 6.0 } else { 9.0 });
        let multi = modes[20..].iter().filter(|&&one| !one).count();
        assert!(multi <= 12, "{modes:?}");
        // The other process ends: its CPU use falls and two threads are faster again.
        set(0.2);
        let modes = run(&mut a, 100, |_, one| if one { 6.0 } else { 3.2 });
        assert!(modes[20..].iter().all(|&one| !one), "{modes:?}");
    }

    #[test]
    fn load_appearing_switches_to_one_thread_within_a_few_passes() {
        let mut a = Adapt::with_load_source(LoadSource::Fixed(no_load, 2));
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

    /// Two threads at 6.7 ms and one at 10.6 ms (B0 on two cores), in seconds.
    fn b0(i: usize, one: bool, slow: std::ops::Range<usize>, slow_time: f64) -> f64 {
        match (one, slow.contains(&i)) {
            (true, _) => 0.0106,
            (false, true) => slow_time,
            (false, false) => 0.0067,
        }
    }

    #[test]
    fn a_brief_slowdown_costs_no_probe() {
        let mut a = Adapt::with_load_source(LoadSource::Fixed(no_load, 2));
        // Ten passes at three times the calibrated time (0.2 s, a virtual machine's stolen time).
        let modes = run(&mut a, 400, |i, one| b0(i, one, 100..110, 0.02));
        assert!(modes[10..].iter().all(|&one| !one), "{modes:?}");
        let (passes, single) = a.single_share();
        assert_eq!(passes, 400);
        assert!(single <= 4, "{single} passes on one thread");
    }

    #[test]
    fn a_slowdown_that_lasts_is_rechecked() {
        let mut a = Adapt::with_load_source(LoadSource::Fixed(no_load, 2));
        // From pass 100 on two threads take 30 ms (a core taken by a process the counters
        // missed): after a second of that, one thread is timed again and wins.
        let modes = run(&mut a, 300, |i, one| b0(i, one, 100..usize::MAX, 0.03));
        assert!(!modes[99]);
        let first_single = (100..300).find(|&i| modes[i]).expect("re-checked");
        assert!((130..150).contains(&first_single), "{first_single}");
        // One thread from then on, but for the re-checks of that decision.
        let multi = modes[200..].iter().filter(|&&one| !one).count();
        assert!(
            multi <= 12,
            "{multi} of 100 passes on two threads: {modes:?}"
        );
    }

    #[test]
    fn cpu_counters_are_read_from_proc() {
        let stat = "cpu  880190 1 71817 3983618 19474 10 292 5119 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(
            machine_busy(stat),
            Some(880190 + 1 + 71817 + 10 + 292 + 5119)
        );
        assert_eq!(machine_busy("intr 1 2 3"), None);
        let own = "4242 (effnet (worker) 1) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0 3";
        assert_eq!(process_busy(own), Some(281));
        assert_eq!(process_busy("4242 (effnet) S 1"), None);
        // 400 ticks busy in two seconds at 100 ticks a second, 200 of them this process's.
        let (then, now) = (
            CpuTicks {
                busy: 1000,
                own: 100,
            },
            CpuTicks {
                busy: 1400,
                own: 300,
            },
        );
        assert_eq!(other_cores(then, now, 100.0, 2.0), 1.0);
        // Counters that moved by less than this process's own time (tick rounding) read zero.
        let now = CpuTicks {
            busy: 1150,
            own: 300,
        };
        assert_eq!(other_cores(then, now, 100.0, 2.0), 0.0);
    }

    /// This process's own work is counted as its own, not as other processes' load.
    #[test]
    fn own_work_is_not_load() {
        let Some((before, cores)) = OtherCpu::ticks() else {
            return; // no /proc
        };
        assert!(cores >= 1);
        let mut cpu = OtherCpu::default();
        assert_eq!(cpu.read(), None);
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let (after, _) = OtherCpu::ticks().expect("readable twice");
        assert!(after.own > before.own, "{before:?} {after:?}");
        let others = cpu.read().expect("a reading 300 ms later");
        assert!(others.is_finite() && others >= 0.0);
    }

    fn one_core_busy() -> Option<f64> {
        Some(1.0)
    }

    /// A process that keeps one of two cores busy from the start, and a calibration that met its
    /// quiet moments (two threads faster in the first passes only): the decision for two threads
    /// is re-checked, since the other process contests the cores, and one thread wins.
    #[test]
    fn a_load_present_from_the_start_is_rechecked() {
        let mut a = Adapt::with_load_source(LoadSource::Fixed(one_core_busy, 2));
        // B0's milliseconds, in seconds: passes too short for the "chosen mode slow" trigger.
        let modes = run(&mut a, 400, |i, one| match (one, i < 8) {
            (true, _) => 0.0048,
            (false, true) => 0.0028,
            (false, false) => 0.0056,
        });
        assert!(
            !modes[8],
            "the lucky calibration chose two threads: {modes:?}"
        );
        // The re-checks of one thread, ever more rarely: a few passes of two threads after that.
        let multi = modes[40..].iter().filter(|&&one| !one).count();
        assert!(
            multi <= 16,
            "{multi} of 360 passes on two threads: {modes:?}"
        );
    }

    static LOAD_ELSEWHERE: AtomicU64 = AtomicU64::new(0);

    fn load_elsewhere() -> Option<f64> {
        reading(&LOAD_ELSEWHERE)
    }

    /// On a machine with cores to spare, other processes coming and going leave the decision alone.
    #[test]
    fn load_on_spare_cores_costs_no_probe() {
        let set = |v: f64| set_reading(&LOAD_ELSEWHERE, v);
        set(1.0);
        let mut a = Adapt::with_load_source(LoadSource::Fixed(load_elsewhere, 64));
        a.load_period = std::time::Duration::ZERO;
        let mut modes = run(&mut a, 50, |_, one| if one { 6.0 } else { 3.2 });
        for load in [10.0, 2.0, 30.0, 0.5] {
            set(load);
            modes.extend(run(&mut a, 50, |_, one| if one { 6.0 } else { 3.2 }));
        }
        assert!(modes[10..].iter().all(|&one| !one), "{modes:?}");
        // Where those processes would take cores this engine's threads need, they re-check.
        // (Two threads as fast as before, so only the load can bring a one-thread pass.)
        set(63.0);
        let modes = run(&mut a, 20, |_, one| if one { 6.0 } else { 3.2 });
        assert!(modes[..3].iter().any(|&one| one), "{modes:?}");
        assert!(modes[10..].iter().all(|&one| !one), "{modes:?}");
        assert_eq!(
            machine_cores("cpu  1 2 3 4\ncpu0 1 2 3 4\ncpu1 1 2 3 4\nintr 5\n"),
            2
        );
    }
}
