//! Learning-rate schedules with linear warm-up.

use crate::config::Schedule;

/// The learning rate of update `step` (0-based) out of `total`: linear warm-up over `warmup`
/// updates from `base/warmup` to `base`, then constant, cosine to 0, or poly `(1 − t)^0.9`.
pub fn learning_rate(
    schedule: Schedule,
    base: f64,
    step: usize,
    total: usize,
    warmup: usize,
) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let t = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        Schedule::Poly => base * (1.0 - t).powf(0.9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let lr = |s, step| learning_rate(s, 1.0, step, 110, 10);
        assert!((lr(Schedule::Cosine, 0) - 0.1).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 9) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 10) - 1.0).abs() < 1e-12);
        assert!((lr(Schedule::Cosine, 60) - 0.5).abs() < 1e-12);
        assert!(lr(Schedule::Cosine, 110) < 1e-12);
        assert!((lr(Schedule::Poly, 60) - 0.5f64.powf(0.9)).abs() < 1e-12);
        assert_eq!(lr(Schedule::Constant, 100), 1.0);
    }
}
