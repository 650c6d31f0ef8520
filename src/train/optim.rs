//! AdamW (Loshchilov & Hutter 2019) with PyTorch's update rule, and a state that a checkpoint
//! can save and restore exactly (Candle's own AdamW keeps its moments private).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

use rayon::prelude::*;

use crate::cpu::simd::with_simd;
use crate::cpu::with_data;

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.999;
pub const EPS: f64 = 1e-8;

/// One trainable parameter and its moment estimates.
struct Slot {
    name: String,
    var: Var,
    m: Var,
    v: Var,
}

pub struct AdamW {
    slots: Vec<Slot>,
    pub weight_decay: f64,
    /// Number of updates taken so far.
    pub step: u64,
}

impl AdamW {
    /// Optimises `params` (name, variable), in the given order.
    pub fn new(params: Vec<(String, Var)>, weight_decay: f64) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot {
                    name,
                    m: Var::from_tensor(&zeros)?,
                    v: Var::from_tensor(&zeros)?,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            slots,
            weight_decay,
            step: 0,
        })
    }

    /// Sums every parameter's gradient over the ranks of a data-parallel run with one
    /// all-reduce of a flat f32 buffer (a missing gradient counts as zero).
    pub fn sum_gradients_over_ranks(&self, grads: &mut GradStore) -> Result<()> {
        let parts = self
            .slots
            .iter()
            .map(|s| {
                let t = s.var.as_tensor();
                match grads.get(t) {
                    Some(g) => g.to_dtype(DType::F32)?.flatten_all(),
                    None => Tensor::zeros(t.elem_count(), DType::F32, t.device()),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = crate::distributed::sum_tensor(&Tensor::cat(&parts, 0)?)?;
        let mut at = 0;
        for s in &self.slots {
            let t = s.var.as_tensor();
            let n = t.elem_count();
            let g = flat.narrow(0, at, n)?.reshape(t.dims())?;
            grads.insert(t, g.to_dtype(t.dtype())?);
            at += n;
        }
        Ok(())
    }

    /// `sqrt(Σ ‖g‖²)` over the parameters' gradients (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for s in &self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                total += if g.device().is_cpu() && g.dtype() == DType::F32 {
                    with_data(&g.contiguous()?, |v| {
                        Ok(v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>())
                    })?
                } else {
                    g.sqr()?
                        .sum_all()?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?
                };
            }
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`, gradients scaled by `grad_scale` (clipping):
    /// `p ← p − lr·λ·p`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p − lr·m̂/(√v̂ + ε)` with bias-corrected `m̂`, `v̂`.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (c1, c2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        for s in &self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            if s.var.device().is_cpu() && s.var.dtype() == DType::F32 {
                self.step_cpu(s, g, lr, grad_scale, (c1, c2))?;
                continue;
            }
            let g = if grad_scale != 1.0 {
                (g * grad_scale)?
            } else {
                g.clone()
            };
            let m = ((s.m.as_tensor() * BETA1)? + (&g * (1.0 - BETA1))?)?;
            let v = ((s.v.as_tensor() * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            let denom = ((&v / c2)?.sqrt()? + EPS)?;
            let update = ((&m / c1)? / denom)?;
            let p = s.var.as_tensor();
            let decayed = (p * (1.0 - lr * self.weight_decay))?;
            s.var.set(&(decayed - (update * lr)?)?)?;
            s.m.set(&m)?;
            s.v.set(&v)?;
        }
        Ok(())
    }

    /// [`Self::step`] for one f32 CPU parameter in a single pass (the same arithmetic).
    fn step_cpu(
        &self,
        s: &Slot,
        g: &Tensor,
        lr: f64,
        grad_scale: f64,
        (c1, c2): (f64, f64),
    ) -> Result<()> {
        let g = g.contiguous()?;
        let n = g.elem_count();
        let (mut p_new, mut m_new, mut v_new) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let update = Update {
            b1: BETA1 as f32,
            b2: BETA2 as f32,
            grad_scale: grad_scale as f32,
            inv_c1: (1.0 / c1) as f32,
            inv_c2: (1.0 / c2) as f32,
            eps: EPS as f32,
            lr: lr as f32,
            decay: (1.0 - lr * self.weight_decay) as f32,
        };
        with_data(s.var.as_tensor(), |p| {
            with_data(s.m.as_tensor(), |m| {
                with_data(s.v.as_tensor(), |v| {
                    with_data(&g, |g| {
                        const CHUNK: usize = 1 << 14;
                        p_new
                            .par_chunks_mut(CHUNK)
                            .zip(m_new.par_chunks_mut(CHUNK))
                            .zip(v_new.par_chunks_mut(CHUNK))
                            .enumerate()
                            .for_each(|(i, ((po, mo), vo))| {
                                let r = i * CHUNK..(i * CHUNK + po.len());
                                let inputs = [&p[r.clone()], &m[r.clone()], &v[r.clone()], &g[r]];
                                with_simd!(update.apply(inputs, [po, mo, vo]))
                            });
                        Ok(())
                    })
                })
            })
        })?;
        let (shape, dev) = (s.var.shape().clone(), s.var.device().clone());
        s.var.set(&Tensor::from_vec(p_new, &shape, &dev)?)?;
        s.m.set(&Tensor::from_vec(m_new, &shape, &dev)?)?;
        s.v.set(&Tensor::from_vec(v_new, &shape, &dev)?)
    }

    /// The moments, named `adam.m.<param>` and `adam.v.<param>`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("adam.m.{}", s.name), s.m.as_tensor().clone()),
                    (format!("adam.v.{}", s.name), s.v.as_tensor().clone()),
                ]
            })
            .collect()
    }

    /// Restores the moments saved by [`Self::state`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &self.slots {
            for (kind, var) in [("m", &s.m), ("v", &s.v)] {
                let key = format!("adam.{kind}.{}", s.name);
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks `{key}`")))?;
                var.set(&t.to_device(var.device())?)?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The coefficients of one AdamW update (f32, as the CPU pass computes it).
#[derive(Clone, Copy)]
struct Update {
    b1: f32,
    b2: f32,
    grad_scale: f32,
    /// 1 / (1 − β₁ᵗ) and 1 / (1 − β₂ᵗ): the bias corrections.
    inv_c1: f32,
    inv_c2: f32,
    eps: f32,
    lr: f32,
    /// 1 − lr·λ: the decoupled weight decay.
    decay: f32,
}

impl Update {
    /// `m = β₁m + (1 − β₁)g`, `v = β₂v + (1 − β₂)g²`, `p = p·(1 − lr·λ) − lr·m̂ / (√v̂ + ε)`
    /// with `g` the gradient times `grad_scale` (clipping), from `[p, m, v, g]` into `[p, m, v]`.
    #[inline(always)]
    fn apply(self, [p, m, v, g]: [&[f32]; 4], [po, mo, vo]: [&mut [f32]; 3]) {
        let inputs = p.iter().zip(m).zip(v).zip(g);
        let outputs = po.iter_mut().zip(mo.iter_mut()).zip(vo.iter_mut());
        for (((po, mo), vo), (((&p, &m), &v), &g)) in outputs.zip(inputs) {
            let g = g * self.grad_scale;
            let m = m * self.b1 + g * (1.0 - self.b1);
            let v = v * self.b2 + g * g * (1.0 - self.b2);
            *po = p * self.decay
                - self.lr * (m * self.inv_c1) / ((v * self.inv_c2).sqrt() + self.eps);
            *mo = m;
            *vo = v;
        }
    }
}
