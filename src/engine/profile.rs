//! Opt-in timing for `effnet bench --profile` (one relaxed atomic load when off): totals per
//! operation kind, and each layer's median time (robust to a loaded machine) with its MACs.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (Duration, u64)>> = Mutex::new(BTreeMap::new());
/// (label, MACs per call, every call's time), in order of first call.
static LAYERS: Mutex<Vec<(String, u64, Vec<Duration>)>> = Mutex::new(Vec::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
    TOTALS.lock().unwrap().clear();
    LAYERS.lock().unwrap().clear();
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

/// One timed layer: its label, MACs per call, median time per call and number of calls.
pub struct LayerTime {
    pub label: String,
    pub macs: u64,
    pub median: Duration,
    pub calls: usize,
}

/// Every layer timed since [`enable`], in execution order.
pub fn report_layers() -> Vec<LayerTime> {
    LAYERS
        .lock()
        .unwrap()
        .iter()
        .map(|(label, macs, times)| {
            let mut t = times.clone();
            t.sort();
            LayerTime {
                label: label.clone(),
                macs: *macs,
                median: t[t.len() / 2],
                calls: t.len(),
            }
        })
        .collect()
}

pub struct Scope {
    kind: &'static str,
    layer: Option<(String, u64)>,
    start: Option<Instant>,
}

/// Times until dropped under operation kind `name`; an empty name records no kind total.
pub fn scope(name: &'static str) -> Scope {
    Scope {
        kind: name,
        layer: None,
        start: (!name.is_empty() && ENABLED.load(Ordering::Relaxed)).then(Instant::now),
    }
}

/// Like [`scope`], and also records the time under the layer `label()` doing `macs()` MACs (both
/// evaluated only while profiling).
pub fn layer(
    name: &'static str,
    label: impl FnOnce() -> String,
    macs: impl FnOnce() -> u64,
) -> Scope {
    if !ENABLED.load(Ordering::Relaxed) {
        return Scope {
            kind: name,
            layer: None,
            start: None,
        };
    }
    Scope {
        kind: name,
        layer: Some((label(), macs())),
        start: Some(Instant::now()),
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        let Some(t) = self.start else { return };
        let elapsed = t.elapsed();
        if !self.kind.is_empty() {
            let mut m = TOTALS.lock().unwrap();
            let e = m.entry(self.kind).or_default();
            e.0 += elapsed;
            e.1 += 1;
        }
        if let Some((label, macs)) = self.layer.take() {
            let mut layers = LAYERS.lock().unwrap();
            match layers.iter_mut().find(|(l, _, _)| *l == label) {
                Some((_, _, times)) => times.push(elapsed),
                None => layers.push((label, macs, vec![elapsed])),
            }
        }
    }
}
