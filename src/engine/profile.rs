//! Opt-in per-operation timing for `effnet bench --profile` (one relaxed atomic load when off).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
    TOTALS.lock().unwrap().clear();
}

/// Time spent per operation kind since [`enable`]: (name, total, calls).
pub fn report() -> Vec<(&'static str, Duration, u64)> {
    TOTALS
        .lock()
        .unwrap()
        .iter()
        .map(|(k, (d, n))| (*k, *d, *n))
        .collect()
}

pub struct Scope(Option<(&'static str, Instant)>);

/// Times until dropped; an empty name records nothing.
pub fn scope(name: &'static str) -> Scope {
    Scope((!name.is_empty() && ENABLED.load(Ordering::Relaxed)).then(|| (name, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((name, t)) = self.0 {
            let mut m = TOTALS.lock().unwrap();
            let e = m.entry(name).or_default();
            e.0 += t.elapsed();
            e.1 += 1;
        }
    }
}
