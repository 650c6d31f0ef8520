//! Where a training step's time goes: wall time per kernel, collected when enabled
//! (`segtrain bench --profile`), free otherwise.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<BTreeMap<&'static str, (f64, usize)>> = Mutex::new(BTreeMap::new());

/// Starts (or stops) collecting, clearing what was collected.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
    TOTALS.lock().expect("profile lock").clear();
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Runs `f`, adding its wall time to `name` when profiling is on.
pub fn time<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let start = Instant::now();
    let r = f();
    let mut totals = TOTALS.lock().expect("profile lock");
    let e = totals.entry(name).or_insert((0.0, 0));
    e.0 += start.elapsed().as_secs_f64() * 1e3;
    e.1 += 1;
    r
}

/// (name, total ms, calls), largest first.
pub fn report() -> Vec<(&'static str, f64, usize)> {
    let mut rows: Vec<_> = TOTALS
        .lock()
        .expect("profile lock")
        .iter()
        .map(|(k, (ms, n))| (*k, *ms, *n))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}
