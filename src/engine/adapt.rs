//! Choosing between all threads and one per forward pass from measured times, so a worker
//! preempted by another process (a loaded machine) cannot stall every parallel region it joins.

/// Keeps multi-threading honest on a loaded machine: the engine uses whichever mode (all threads or
/// one) has the lower recent time per pass (per input shape), and re-times the other on the 4th
/// pass and every [`Adapt::PROBE`]-th. A worker preempted by another process otherwise stalls every
/// parallel region it joined.
#[derive(Default)]
pub(super) struct Adapt {
    shape: (usize, usize, usize),
    calls: u64,
    multi: Option<f64>,
    single: Option<f64>,
    /// Whether the current pass re-times the mode not in use.
    probing: bool,
}

impl Adapt {
    const PROBE: u64 = 16;

    pub(super) fn choose_single(&mut self, threads: usize, shape: (usize, usize, usize)) -> bool {
        if threads == 1 {
            return true;
        }
        if shape != self.shape {
            *self = Adapt {
                shape,
                ..Adapt::default()
            };
        }
        self.calls += 1;
        self.probing = false;
        match (self.multi, self.single) {
            // The first pass (buffer allocation, cold caches) is not recorded.
            (None, _) => false,
            (Some(_), None) => true,
            // The 4th pass re-times the mode not in use at once: the first timing of each mode may
            // include a worker's first-touch allocations, and must not decide for good.
            _ if self.calls == 4 || self.calls.is_multiple_of(Self::PROBE) => {
                self.probing = true;
                !self.prefers_single()
            }
            _ => self.prefers_single(),
        }
    }

    fn prefers_single(&self) -> bool {
        matches!((self.multi, self.single), (Some(m), Some(s)) if s < m)
    }

    pub(super) fn record(&mut self, single: bool, seconds: f64) {
        if self.calls <= 1 {
            return;
        }
        let probing = self.probing;
        let slot = if single {
            &mut self.single
        } else {
            &mut self.multi
        };
        // A probe's time replaces the old one (which may date from warm-up or another load); the
        // mode in use keeps a running average.
        *slot = Some(match *slot {
            Some(old) if !probing => 0.75 * old + 0.25 * seconds,
            _ => seconds,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Adapt;

    /// Feeds `Adapt` the time each mode takes (the first multi-threaded pass timed as a warm-up
    /// outlier) and returns the modes it chose, true for one thread.
    fn choices(multi: f64, single: f64, first_multi: f64, passes: usize) -> Vec<bool> {
        let mut adapt = Adapt::default();
        let mut seen_multi = 0;
        (0..passes)
            .map(|_| {
                let one = adapt.choose_single(2, (1, 224, 224));
                let t = if one {
                    single
                } else {
                    seen_multi += 1;
                    if seen_multi == 2 { first_multi } else { multi }
                };
                adapt.record(one, t);
                one
            })
            .collect()
    }

    #[test]
    fn a_slow_first_timing_does_not_keep_the_engine_on_one_thread() {
        // Two threads 1.9x faster, but the first recorded multi-threaded pass took 4x as long.
        let modes = choices(3.2, 6.0, 24.0, 50);
        assert!(
            modes[4..].iter().filter(|&&one| one).count() <= 3,
            "{modes:?}"
        );
    }

    #[test]
    fn a_loaded_machine_settles_on_one_thread() {
        let modes = choices(9.0, 6.0, 9.0, 50);
        assert!(
            modes[4..].iter().filter(|&&one| !one).count() <= 3,
            "{modes:?}"
        );
    }
}
