//! The whole U-Net as one Candle op on the CPU: `(images, packed parameters) → logits`, with a
//! backward pass that returns the gradient of the packed parameters.
//!
//! One op instead of one per layer keeps Candle's autograd out of the activations: it would
//! allocate, zero and add a gradient buffer for every intermediate tensor. Inside, activations
//! stay in the padded channels-last layout from input to head; skip gradients accumulate in
//! place. The parameters are packed block by block in network order (`inc`, `down1..`, `up1..`;
//! an `up` block starts with its transposed convolution's weight and bias), each block as
//! conv1, bn1 weight and bias, conv2, bn2 weight and bias; then the head's weight and bias,
//! then those of deep supervision's auxiliary heads, shallowest level first. With auxiliary
//! heads the output is one flat vector: the logits, then each auxiliary head's logits.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{BlockKind, UNetConfig};
use crate::cpu::profile::time;
use crate::cpu::slice;
use crate::kernels::layer::{self, LayerShape, Moments};
use crate::kernels::linear::{head_backward, head_forward, up_backward, up_forward};
use crate::kernels::padded::{from_padded, to_padded, Geom};
use crate::kernels::pool;

/// One step of the network, with the activations (by index) it reads and writes and the
/// ranges of its parameters in the packed vector.
enum Stage {
    Layer {
        g: Geom,
        shape: LayerShape,
        inputs: Vec<usize>,
        out: usize,
        w: Range<usize>,
        gamma: Range<usize>,
        beta: Range<usize>,
    },
    Pool {
        g: Geom,
        c: usize,
        input: usize,
        out: usize,
    },
    Up {
        g: Geom,
        ci: usize,
        co: usize,
        input: usize,
        out: usize,
        w: Range<usize>,
        b: Range<usize>,
    },
    Head {
        g: Geom,
        ci: usize,
        k: usize,
        input: usize,
        w: Range<usize>,
        b: Range<usize>,
        /// Where its logits sit in the op's (flat) output.
        out: Range<usize>,
    },
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    activations: Vec<Vec<f32>>,
    stages: Vec<Stage>,
    /// One per layer, in stage order.
    layers: Vec<layer::Saved>,
}

/// The forward pass under construction.
struct Exec<'a> {
    params: &'a [f32],
    next: usize,
    eps: f64,
    running: Option<&'a [Moments]>,
    activations: Vec<Vec<f32>>,
    stages: Vec<Stage>,
    layers: Vec<layer::Saved>,
    /// Batch statistics of every BatchNorm and the number of pixels they cover.
    moments: Vec<(Moments, usize)>,
}

impl Exec<'_> {
    fn take(&mut self, n: usize) -> Range<usize> {
        let r = self.next..self.next + n;
        self.next += n;
        r
    }

    fn push(&mut self, a: Vec<f32>) -> usize {
        self.activations.push(a);
        self.activations.len() - 1
    }

    fn layer(&mut self, g: Geom, inputs: &[usize], channels: Vec<usize>, out: usize) -> usize {
        let shape = LayerShape {
            inputs: channels,
            out,
        };
        let w = self.take(out * shape.ci_total() * 9);
        let gamma = self.take(out);
        let beta = self.take(out);
        let bn = self.moments.len();
        let running = self.running.map(|r| &r[bn]);
        let xs: Vec<&[f32]> = inputs
            .iter()
            .map(|&i| self.activations[i].as_slice())
            .collect();
        let f = layer::forward(
            g,
            &shape,
            &xs,
            &self.params[w.clone()],
            &self.params[gamma.clone()],
            &self.params[beta.clone()],
            self.eps,
            running,
        );
        self.moments.push((f.moments.clone(), f.pixels));
        if running.is_none() {
            self.layers.push(layer::Saved {
                z: f.z,
                moments: f.moments,
            });
        }
        let id = self.push(f.y);
        self.stages.push(Stage::Layer {
            g,
            shape,
            inputs: inputs.to_vec(),
            out: id,
            w,
            gamma,
            beta,
        });
        id
    }

    /// `[conv → BN → ReLU] × 2` of the concatenation of `inputs`.
    fn double(&mut self, g: Geom, inputs: &[usize], channels: Vec<usize>, out: usize) -> usize {
        let first = self.layer(g, inputs, channels, out);
        self.layer(g, &[first], vec![out], out)
    }

    fn pool(&mut self, g: Geom, input: usize, c: usize) -> usize {
        let y = time("maxpool forward", || {
            pool::forward(g, &self.activations[input], c)
        });
        let out = self.push(y);
        self.stages.push(Stage::Pool { g, c, input, out });
        out
    }

    fn up(&mut self, g: Geom, input: usize, ci: usize, co: usize) -> usize {
        let w = self.take(ci * co * 4);
        let b = self.take(co);
        let y = time("upconv forward", || {
            up_forward(
                g,
                &self.activations[input],
                ci,
                &self.params[w.clone()],
                &self.params[b.clone()],
                co,
            )
        });
        let out = self.push(y);
        self.stages.push(Stage::Up {
            g,
            ci,
            co,
            input,
            out,
            w,
            b,
        });
        out
    }

    /// A 1×1 head; its logits are appended to `output`.
    fn head(&mut self, g: Geom, input: usize, ci: usize, k: usize, output: &mut Vec<f32>) {
        let w = self.take(k * ci);
        let b = self.take(k);
        let logits = time("head forward", || {
            head_forward(
                g,
                &self.activations[input],
                ci,
                &self.params[w.clone()],
                &self.params[b.clone()],
                k,
            )
        });
        let out = output.len()..output.len() + logits.len();
        output.extend(logits);
        self.stages.push(Stage::Head {
            g,
            ci,
            k,
            input,
            w,
            b,
            out,
        });
    }
}

/// The U-Net's forward (and backward) on the CPU; see the module documentation.
pub struct UNetKernel {
    config: UNetConfig,
    eps: f64,
    /// Decoder levels with an auxiliary head (training only), shallowest first.
    aux_levels: Vec<usize>,
    /// Evaluation: the running statistics of every BatchNorm, in network order.
    running: Option<Vec<Moments>>,
    saved: Arc<Mutex<Option<Saved>>>,
    moments: Arc<Mutex<Vec<(Moments, usize)>>>,
}

impl UNetKernel {
    /// Training mode: batch statistics, readable after the forward pass with [`Self::moments`];
    /// auxiliary heads at `aux_levels`.
    pub fn train(config: UNetConfig, eps: f64, aux_levels: Vec<usize>) -> Self {
        Self {
            config,
            eps,
            aux_levels,
            running: None,
            saved: Arc::default(),
            moments: Arc::default(),
        }
    }

    /// Evaluation mode with the running statistics of every BatchNorm, in network order.
    pub fn eval(config: UNetConfig, eps: f64, running: Vec<Moments>) -> Self {
        Self {
            config,
            eps,
            aux_levels: vec![],
            running: Some(running),
            saved: Arc::default(),
            moments: Arc::default(),
        }
    }

    /// A handle to the batch statistics of every BatchNorm (network order) of the forward pass,
    /// with the number of pixels each covers.
    pub fn moments(&self) -> Arc<Mutex<Vec<(Moments, usize)>>> {
        self.moments.clone()
    }

    fn forward(
        &self,
        x: &[f32],
        g: Geom,
        params: &[f32],
    ) -> (Vec<f32>, Saved, Vec<(Moments, usize)>) {
        let c = &self.config;
        let mut e = Exec {
            params,
            next: 0,
            eps: self.eps,
            running: self.running.as_deref(),
            activations: vec![],
            stages: vec![],
            layers: vec![],
            moments: vec![],
        };
        let input = time("layout conversion", || to_padded(x, g, c.in_channels));
        // the stage program, block by block from the one description of the network
        let mut cur = e.push(input);
        let mut skips = vec![];
        let mut geom = g;
        // the output of the decoder at each level with an auxiliary head
        let mut decoder = vec![];
        for b in c.blocks() {
            cur = match b.kind {
                BlockKind::Inc => e.double(geom, &[cur], vec![b.cin], b.cout),
                BlockKind::Down => {
                    skips.push(cur);
                    let pooled = e.pool(geom, cur, b.cin);
                    geom = geom.half();
                    e.double(geom, &[pooled], vec![b.cin], b.cout)
                }
                BlockKind::Up => {
                    let half = b.cin / 2;
                    let up = e.up(geom, cur, b.cin, half);
                    geom = geom.double();
                    let skip = skips.pop().expect("one skip per level");
                    let out = e.double(geom, &[skip, up], vec![half, half], b.cout);
                    if self.aux_levels.contains(&b.level) {
                        decoder.push((b.level, out, geom, b.cout));
                    }
                    out
                }
            };
        }
        let mut logits = vec![];
        e.head(geom, cur, c.base_width, c.classes, &mut logits);
        for &level in &self.aux_levels {
            let &(_, input, g, ci) = decoder
                .iter()
                .find(|d| d.0 == level)
                .expect("an up block at every auxiliary level");
            e.head(g, input, ci, c.classes, &mut logits);
        }
        let saved = Saved {
            activations: e.activations,
            stages: e.stages,
            layers: e.layers,
        };
        (logits, saved, e.moments)
    }

    /// The gradients of the packed parameters and, if `input_grad`, of the images (NCHW).
    ///
    /// One walk over the stages in reverse, one arm per stage kind: the activation gradients
    /// it threads from stage to stage (accumulated in place at the skips) are its state.
    fn backward(
        &self,
        saved: Saved,
        params: &[f32],
        dlogits: &[f32],
        input_grad: bool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let Saved {
            activations: acts,
            stages,
            mut layers,
        } = saved;
        let mut dparams = vec![0f32; params.len()];
        let mut grads: Vec<Option<Vec<f32>>> = (0..acts.len()).map(|_| None).collect();
        let add = |grads: &mut Vec<Option<Vec<f32>>>, id: usize, g: Vec<f32>| match &mut grads[id] {
            Some(existing) => existing
                .par_iter_mut()
                .zip(g.par_iter())
                .for_each(|(a, b)| *a += b),
            slot => *slot = Some(g),
        };
        let mut input_geom = None;
        for stage in stages.iter().rev() {
            match stage {
                Stage::Head {
                    g,
                    ci,
                    k,
                    input,
                    w,
                    b,
                    out,
                } => {
                    let dy = &dlogits[out.clone()];
                    let (dx, dw, db) = time("head backward", || {
                        head_backward(*g, &acts[*input], *ci, &params[w.clone()], *k, dy)
                    });
                    add(&mut grads, *input, dx);
                    dparams[w.clone()].copy_from_slice(&dw);
                    dparams[b.clone()].copy_from_slice(&db);
                }
                Stage::Up {
                    g,
                    ci,
                    co,
                    input,
                    out,
                    w,
                    b,
                } => {
                    let dy = grads[*out]
                        .take()
                        .expect("the up-convolution's output gradient");
                    let (dx, dw, db) = time("upconv backward", || {
                        up_backward(*g, &acts[*input], *ci, &params[w.clone()], *co, &dy)
                    });
                    add(&mut grads, *input, dx);
                    dparams[w.clone()].copy_from_slice(&dw);
                    dparams[b.clone()].copy_from_slice(&db);
                }
                Stage::Layer {
                    g,
                    shape,
                    inputs,
                    out,
                    w,
                    gamma,
                    beta,
                } => {
                    let dy = grads[*out].take().expect("the layer's output gradient");
                    let saved = layers.pop().expect("one saved state per layer");
                    let xs: Vec<&[f32]> = inputs.iter().map(|&i| acts[i].as_slice()).collect();
                    let need: Vec<bool> = inputs.iter().map(|&i| i != 0 || input_grad).collect();
                    let b = layer::backward(
                        *g,
                        shape,
                        &xs,
                        &need,
                        &params[w.clone()],
                        &params[gamma.clone()],
                        &acts[*out],
                        &saved,
                        &dy,
                        self.eps,
                    );
                    for (&i, dx) in inputs.iter().zip(b.inputs) {
                        if let Some(dx) = dx {
                            add(&mut grads, i, dx);
                        }
                    }
                    if inputs.contains(&0) {
                        input_geom = Some((*g, shape.inputs[0]));
                    }
                    dparams[w.clone()].copy_from_slice(&b.w);
                    dparams[gamma.clone()].copy_from_slice(&b.gamma);
                    dparams[beta.clone()].copy_from_slice(&b.beta);
                }
                Stage::Pool { g, c, input, out } => {
                    let dy = grads[*out].take().expect("the pooled gradient");
                    let dx = grads[*input].get_or_insert_with(|| vec![0f32; g.rows() * c]);
                    time("maxpool backward", || {
                        pool::backward_into(*g, &acts[*input], &dy, *c, dx)
                    });
                }
            }
        }
        let dinput = match (input_grad, input_geom, grads[0].take()) {
            (true, Some((g, c)), Some(dx)) => Some(from_padded(&dx, g, c)),
            _ => None,
        };
        (dparams, dinput)
    }
}

impl CustomOp2 for UNetKernel {
    fn name(&self) -> &'static str {
        "unet-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l1.shape().dims4()?;
        if c != self.config.in_channels {
            bail!(
                "unet: {c} input channels, the model takes {}",
                self.config.in_channels
            );
        }
        let params = slice(s2, l2)?;
        let aux: usize = self
            .config
            .aux_head_spec(&self.aux_levels)
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        let expected = self.config.trainable_values() + aux;
        if params.len() != expected {
            bail!(
                "unet: {} packed parameters, the network takes {expected}",
                params.len()
            );
        }
        let g = Geom { n, h, w };
        let (logits, saved, moments) = self.forward(slice(s1, l1)?, g, params);
        *self.moments.lock().expect("moments lock") = moments;
        if self.running.is_none() {
            *self.saved.lock().expect("saved activations lock") = Some(saved);
        }
        let shape = if self.aux_levels.is_empty() {
            Shape::from((n, self.config.classes, h, w))
        } else {
            Shape::from(logits.len())
        };
        Ok((CpuStorage::F32(logits), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.lock().expect("saved activations lock").take() else {
            bail!("unet: backward needs one training forward pass");
        };
        let p: Vec<f32> = params.to_vec1()?;
        let dlogits: Vec<f32> = grad.flatten_all()?.to_vec1()?;
        let (dparams, dinput) = self.backward(saved, &p, &dlogits, x.track_op());
        let n = dparams.len();
        let dx = match dinput {
            Some(d) => Some(Tensor::from_vec(d, x.dims(), x.device())?),
            None => None,
        };
        Ok((dx, Some(Tensor::from_vec(dparams, n, params.device())?)))
    }
}
