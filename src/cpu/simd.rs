//! Branch-free f32 math that LLVM vectorises, and runtime dispatch to an AVX2 + FMA build of a
//! kernel loop: the element-wise kernels are written as plain scalar loops over slices, and
//! [`with_simd!`] compiles them a second time with those features enabled, used when the CPU
//! has them.
//!
//! `exp` and `ln` follow the Cephes single-precision polynomials (relative error ≈ 1e-7 over
//! their ranges).

/// `e^x` for x ≤ 88.3 (larger inputs give e^88.3 ≈ 2.1e38); inputs below −87.3 give
/// ≈ 1.2e-38 instead of a denormal or 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.336_54, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let r2 = r * r;
    let p = (((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r2
        + r
        + 1.0;
    // 2^n from the bits of n + 1.5·2^23, whose low mantissa bits hold n: no float-to-int
    // conversion (Rust's saturating one vectorises poorly)
    let n_bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4b40_0000);
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// `ln x` for normal x > 0.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 as f32 - 126.0;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000); // [0.5, 1)
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    e = if small { e - 1.0 } else { e };
    let m = if small { m + m - 1.0 } else { m - 1.0 };
    let z = m * m;
    let mut y =
        ((((((((7.037_683_6e-2 * m - 0.115_146_1) * m + 0.116_769_98) * m - 0.124_201_41) * m
            + 0.142_493_23)
            * m
            - 0.166_680_57)
            * m
            + 0.200_007_15)
            * m
            - 0.249_999_94)
            * m
            + 0.333_333_3)
            * m
            * z;
    y += e * -2.121_944_4e-4;
    y += -0.5 * z;
    m + y + e * 0.693_359_4
}

/// `ln(1 + x)` for x ≥ 0, accurate for tiny x.
#[inline(always)]
pub fn ln_1p(x: f32) -> f32 {
    let u = 1.0 + x;
    let d = u - 1.0;
    // computed unconditionally so that the caller's loop vectorises
    let corrected = ln(u) * (x / d.max(f32::MIN_POSITIVE));
    if d == 0.0 {
        x
    } else {
        corrected
    }
}

/// `(σ(x), σ(−x))`, both accurate for saturated x, and `e^{−|x|}`.
#[inline(always)]
pub fn sigmoid_pq(x: f32) -> (f32, f32, f32) {
    let e = exp(-x.abs());
    let inv = 1.0 / (1.0 + e);
    let (p, q) = if x >= 0.0 {
        (inv, e * inv)
    } else {
        (e * inv, inv)
    };
    (p, q, e)
}

/// `(log σ(x), log σ(−x), σ(x), σ(−x))`, accurate for saturated x. `log σ(x) = min(x, 0) −
/// ln(1 + e^{−|x|})`, the generic path's formula.
#[inline(always)]
pub fn sigmoid_parts(x: f32) -> (f32, f32, f32, f32) {
    let (p, q, e) = sigmoid_pq(x);
    let log_p = x.min(0.0) - ln(1.0 + e);
    (log_p, log_p - x, p, q)
}

/// The vector instruction sets the kernels can be built for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Isa {
    /// Whatever the compiler emits for the baseline target (SSE2 on x86-64, NEON on aarch64).
    Generic,
    /// AVX2 + FMA (256-bit).
    Avx2,
    /// AVX-512 F, BW and VL (512-bit), with AVX2 + FMA.
    Avx512,
}

/// The environment variable that caps the element-wise kernels' instruction set
/// (`generic`, `avx2` or `avx512`; for comparisons: the widest the CPU has is the default).
pub const ISA_ENV: &str = "SEGTRAIN_ISA";

static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();

/// The widest instruction set the CPU runs.
fn detected() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let avx512 = std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl");
        match (avx2, avx512) {
            (true, true) => Isa::Avx512,
            (true, false) => Isa::Avx2,
            _ => Isa::Generic,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Generic
    }
}

/// The instruction set the element-wise kernels run: the widest the CPU has, capped by
/// [`limit_isa`] or, where that was not called, by [`ISA_ENV`] (an unknown value there is
/// ignored with a warning). Fixed on first use.
pub fn isa() -> Isa {
    *ISA.get_or_init(|| {
        let cap = match std::env::var(ISA_ENV) {
            Ok(v) => <Isa as clap::ValueEnum>::from_str(&v, true).unwrap_or_else(|_| {
                eprintln!("warning: {ISA_ENV}=`{v}` is not generic, avx2 or avx512; ignored");
                Isa::Avx512
            }),
            Err(_) => Isa::Avx512,
        };
        detected().min(cap)
    })
}

/// Caps the kernels' instruction set at `cap` (before any kernel ran); returns the one used.
pub fn limit_isa(cap: Isa) -> Result<Isa, String> {
    let want = detected().min(cap);
    match *ISA.get_or_init(|| want) {
        got if got == want => Ok(got),
        got => Err(format!(
            "the kernels already run {got:?}; cap them before any work"
        )),
    }
}

/// True when the kernels run their AVX2 + FMA builds (or wider).
pub fn has_avx2() -> bool {
    isa() >= Isa::Avx2
}

/// True when the kernels run their AVX-512 builds.
pub fn has_avx512() -> bool {
    isa() >= Isa::Avx512
}

/// `with_simd!(expr)` evaluates `expr` (typically a call of an `#[inline(always)]` kernel) in a
/// function compiled for the widest vectors the CPU has — AVX-512 (512-bit), else AVX2 + FMA —
/// and as it is otherwise (one binary for every x86-64 and ARM machine).
macro_rules! with_simd {
    ($body:expr) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
            unsafe fn widest<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if $crate::cpu::simd::has_avx512() {
                // SAFETY: the CPU supports the enabled features (checked just above).
                unsafe { widest(|| $body) }
            } else if $crate::cpu::simd::has_avx2() {
                // SAFETY: the CPU supports the enabled features (checked just above).
                unsafe { wide(|| $body) }
            } else {
                $body
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $body
        }
    }};
}
pub(crate) use with_simd;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_match_the_standard_library() {
        for i in -1740..1760 {
            let x = i as f32 * 0.05;
            let want = (x as f64).exp();
            assert!(((exp(x) as f64 - want) / want).abs() < 3e-7, "exp({x})");
            if x > 0.0 {
                let want = (x as f64).ln();
                assert!(
                    (ln(x) as f64 - want).abs() < 3e-7 * want.abs().max(1.0),
                    "ln({x})"
                );
            }
        }
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1e4) > 0.0 && exp(1e4).is_finite());
        for x in [0.0f32, 1e-30, 1e-10, 1e-4, 0.3, 1.0] {
            let want = (x as f64).ln_1p();
            assert!(
                (ln_1p(x) as f64 - want).abs() <= 3e-7 * want.abs() + 1e-45,
                "ln_1p({x})"
            );
        }
        for x in [-100.0f32, -20.0, -1.0, 0.0, 0.5, 30.0, 100.0] {
            let (lp, lq, p, q) = sigmoid_parts(x);
            let sp = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((p as f64 - sp).abs() < 1e-6 && (q as f64 - (1.0 - sp)).abs() < 1e-6);
            assert!(lp.is_finite() && lq.is_finite());
        }
    }
}
