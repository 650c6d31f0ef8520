//! The U-Net, parameter for parameter the PyTorch module of the README (same names, shapes and
//! initialisation scheme), so that `model.safetensors` loads into it with `strict=True`.

mod activation;
pub mod deep_supervision;
mod fast;
mod init;
mod kind;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use activation::Activation;
use fast::UNetKernel;
pub use init::seeded_var_builder;
pub use kind::{ModelKind, SegmentationModel};

use crate::distributed;
use crate::kernels::layer::Moments;
use crate::kernels::Kernels;

/// BatchNorm epsilon and momentum (PyTorch's defaults).
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// The architecture: enough to rebuild the module and to check a weight file against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub classes: usize,
    pub base_width: usize,
    pub depth: usize,
}

/// One `[Conv3×3 → BN → ReLU] × 2` block of the network: the one description of the topology
/// that the module, its `state_dict`, its FLOPs and its memory are derived from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// `inc`, `down{i}` or `up{i}` (the `state_dict` prefix).
    pub name: String,
    /// Input channels; of an `up` block, those of `cat([skip, up])`, also the channels its
    /// transposed convolution takes (to `cin / 2`).
    pub cin: usize,
    pub cout: usize,
    /// The block works on maps of side `size >> level`.
    pub level: usize,
    /// Preceded by the 2×2 max-pooling (`down` blocks) or by `ConvTranspose2d(cin, cin/2, 2,
    /// stride 2)` from level + 1 (`up` blocks).
    pub kind: BlockKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Inc,
    Down,
    Up,
}

impl UNetConfig {
    /// The blocks in network order: `inc`, `down1..down{d}`, `up1` (deepest) `..up{d}`; the
    /// 1×1 `head` (`base_width` → `classes`) follows the last.
    pub fn blocks(&self) -> Vec<Block> {
        let (f, d) = (self.base_width, self.depth);
        let block = |name: String, cin, cout, level, kind| Block {
            name,
            cin,
            cout,
            level,
            kind,
        };
        let mut blocks = vec![block("inc".into(), self.in_channels, f, 0, BlockKind::Inc)];
        for i in 1..=d {
            blocks.push(block(
                format!("down{i}"),
                f << (i - 1),
                f << i,
                i,
                BlockKind::Down,
            ));
        }
        for i in 1..=d {
            let a = f << (d - i + 1);
            blocks.push(block(format!("up{i}"), a, a / 2, d - i, BlockKind::Up));
        }
        blocks
    }

    /// Every entry of the PyTorch module's `state_dict`: name, shape and whether it is a
    /// trainable parameter (BatchNorm running statistics and `num_batches_tracked` are buffers).
    pub fn state_dict_spec(&self) -> Vec<(String, Vec<usize>, DType)> {
        let mut spec = vec![];
        let blocks = self.blocks();
        for b in &blocks {
            for (i, cin) in [(1, b.cin), (2, b.cout)] {
                spec.push((
                    format!("{}.conv{i}.weight", b.name),
                    vec![b.cout, cin, 3, 3],
                    DType::F32,
                ));
                for stat in ["weight", "bias", "running_mean", "running_var"] {
                    spec.push((format!("{}.bn{i}.{stat}", b.name), vec![b.cout], DType::F32));
                }
                spec.push((
                    format!("{}.bn{i}.num_batches_tracked", b.name),
                    vec![],
                    DType::I64,
                ));
            }
        }
        for b in blocks.iter().filter(|b| b.kind == BlockKind::Up) {
            let a = b.cin;
            spec.push((
                format!("{}.up.weight", b.name),
                vec![a, a / 2, 2, 2],
                DType::F32,
            ));
            spec.push((format!("{}.up.bias", b.name), vec![a / 2], DType::F32));
        }
        spec.push((
            "head.weight".into(),
            vec![self.classes, self.base_width, 1, 1],
            DType::F32,
        ));
        spec.push(("head.bias".into(), vec![self.classes], DType::F32));
        spec
    }

    /// Deep supervision's auxiliary 1×1 heads at decoder `levels`: `aux{level}` maps the
    /// `base_width << level` channels of that level's `up` block to `classes` logits. They are
    /// trained with the network but are not part of its `state_dict`.
    pub fn aux_head_spec(&self, levels: &[usize]) -> Vec<(String, Vec<usize>)> {
        levels
            .iter()
            .flat_map(|&l| {
                [
                    (
                        format!("aux{l}.weight"),
                        vec![self.classes, self.base_width << l, 1, 1],
                    ),
                    (format!("aux{l}.bias"), vec![self.classes]),
                ]
            })
            .collect()
    }

    /// Forward FLOPs of one image of `size × size` (multiply-adds count as 2).
    pub fn forward_flops(&self, size: usize) -> f64 {
        let conv = |cin: usize, cout: usize, k: usize, pixels: f64| {
            2.0 * (cin * cout * k * k) as f64 * pixels
        };
        let pixels = |level: usize| ((size >> level) as f64).powi(2);
        let mut flops = conv(self.base_width, self.classes, 1, pixels(0));
        for b in self.blocks() {
            flops +=
                conv(b.cin, b.cout, 3, pixels(b.level)) + conv(b.cout, b.cout, 3, pixels(b.level));
            if b.kind == BlockKind::Up {
                flops += conv(b.cin, b.cin / 2, 2, pixels(b.level + 1));
            }
        }
        flops
    }

    /// Number of values in the `state_dict` (parameters and buffers).
    pub fn parameter_count(&self) -> f64 {
        self.state_dict_spec()
            .iter()
            .map(|(_, shape, _)| shape.iter().map(|&d| d as f64).product::<f64>())
            .sum()
    }

    /// Values of the trainable parameters (the `state_dict` less BatchNorm's buffers): the
    /// length of the packed vector the fast CPU op takes.
    pub fn trainable_values(&self) -> usize {
        self.state_dict_spec()
            .iter()
            .filter(|(name, _, _)| is_trainable(name))
            .map(|(_, shape, _)| shape.iter().product::<usize>())
            .sum()
    }

    /// Values of the maps one image of `size × size` flows through in a forward pass: the
    /// input, every convolution's output (BatchNorm + ReLU keep its shape), the pooled and the
    /// up-sampled maps, and the logits.
    pub fn activation_values(&self, size: usize) -> f64 {
        let pixels = |level: usize| ((size >> level) as f64).powi(2);
        let mut values = (self.in_channels + self.classes) as f64 * pixels(0);
        for b in self.blocks() {
            let extra = match b.kind {
                BlockKind::Inc => 0,
                // the pooled input, and the up-sampled half of the concatenation
                BlockKind::Down => b.cin,
                BlockKind::Up => b.cin / 2,
            };
            values += (2 * b.cout + extra) as f64 * pixels(b.level);
        }
        values
    }

    /// An estimate of the bytes one training step (forward, loss, backward, AdamW update) of
    /// `batch` images of `size × size` needs: the f32 weights, their gradients and AdamW's two
    /// moments, and the activations and their gradients at `activation_bytes` per value (4:
    /// f32, 2: bf16 or f16), with what the implementation keeps besides (pre-BatchNorm
    /// values, the loss's per-pixel terms).
    pub fn training_bytes(&self, batch: usize, size: usize, activation_bytes: usize) -> f64 {
        /// Live copies of each activation value at the peak of a step: the map and its
        /// pre-BatchNorm value kept for the backward pass, the gradient flowing back, and
        /// temporaries (measured with `segtrain bench`).
        const LIVE_COPIES: f64 = 4.0;
        let weights = 4.0 * 4.0 * self.parameter_count();
        let activations = batch as f64
            * self.activation_values(size)
            * (activation_bytes as f64).max(4.0)
            * LIVE_COPIES;
        weights + activations
    }

    /// An estimate of the bytes an evaluation-mode forward pass of `batch` images of
    /// `size × size` needs (weights, and the maps alive at once).
    pub fn inference_bytes(&self, batch: usize, size: usize) -> f64 {
        4.0 * self.parameter_count() + 4.0 * batch as f64 * self.activation_values(size)
    }
}

/// PyTorch's default Conv init: U(−1/√fan_in, 1/√fan_in) for weight and bias
/// (kaiming_uniform with a = √5).
fn torch_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// BatchNorm2d with PyTorch's semantics: batch statistics in training (running statistics
/// updated with momentum 0.1 and the unbiased variance), running statistics in evaluation.
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.0))?,
        })
    }

    /// `relu(bn(x))` with Candle's ops; in training also updates the running statistics.
    /// Statistics and normalisation run in f32 whatever `x`'s type (as PyTorch's autocast
    /// does); the result has `x`'s type.
    fn forward_relu(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = &x.to_dtype(DType::F32)?;
        let (mean, var) = if train {
            // per-channel means over the batch; with synchronised BatchNorm over every rank's
            // part, as the sum of the parts' means weighted by their share of the pixels
            let (n, _, h, w) = x.dims4()?;
            let mut count = [(n * h * w) as f64];
            distributed::sum_batch_norm(&mut count);
            let share = (n * h * w) as f64 / count[0];
            let batch_mean = |t: &Tensor| -> Result<Tensor> {
                let mean = t.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3)?;
                match share {
                    1.0 => Ok(mean),
                    _ => distributed::sum_batch_norm_tensor(&(mean * share)?),
                }
            };
            let mean = batch_mean(x)?;
            let var = batch_mean(&x.broadcast_sub(&mean)?.sqr()?)?;
            let (mean, var) = (mean.flatten_all()?, var.flatten_all()?);
            self.update(&mean.detach(), &var.detach(), count[0] as usize)?;
            (mean, var)
        } else {
            (self.running_mean.clone(), self.running_var.clone())
        };
        let shape = (1, (), 1, 1);
        let inv_std = (var + BN_EPS)?.sqrt()?.recip()?;
        let scale = (&self.weight * &inv_std)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        x.broadcast_mul(&scale.reshape(shape)?)?
            .broadcast_add(&shift.reshape(shape)?)?
            .relu()?
            .to_dtype(dtype)
    }

    /// Folds batch statistics (mean, biased variance over `count` values) into the running
    /// ones, in place.
    fn update(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let count = count as f64;
        let unbiased = (var * (count / (count - 1.0).max(1.0)))?;
        let m = BN_MOMENTUM;
        let new_mean = ((&self.running_mean * (1.0 - m))? + (mean * m)?)?;
        let new_var = ((&self.running_var * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.slice_set(&new_mean, 0, 0)?;
        self.running_var.slice_set(&new_var, 0, 0)
    }

    fn running(&self) -> Result<Moments> {
        Ok(Moments {
            mean: self.running_mean.to_vec1()?,
            var: self.running_var.to_vec1()?,
        })
    }
}

/// The convolution `conv` of `x` with the f32 weight `w`, in `x`'s floating-point type.
/// Candle 0.11's CPU matmul has no bf16 kernel: there the bf16 operands are multiplied and
/// summed in f32 and the result rounded to bf16 (as GPU tensor cores accumulate in f32).
fn conv_in(
    x: &Tensor,
    w: &Tensor,
    conv: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dt = x.dtype();
    if dt == DType::BF16 && x.device().is_cpu() {
        let w = w.to_dtype(dt)?.to_dtype(DType::F32)?;
        return conv(&x.to_dtype(DType::F32)?, &w)?.to_dtype(dt);
    }
    conv(x, &w.to_dtype(dt)?)
}

/// `[Conv3×3 (no bias) → BN → ReLU] × 2`.
pub struct DoubleConv {
    conv1: Tensor,
    bn1: BatchNorm,
    conv2: Tensor,
    bn2: BatchNorm,
}

impl DoubleConv {
    fn new(a: usize, b: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: vb
                .pp("conv1")
                .get_with_hints((b, a, 3, 3), "weight", torch_uniform(a * 9))?,
            bn1: BatchNorm::new(b, vb.pp("bn1"))?,
            conv2: vb
                .pp("conv2")
                .get_with_hints((b, b, 3, 3), "weight", torch_uniform(b * 9))?,
            bn2: BatchNorm::new(b, vb.pp("bn2"))?,
        })
    }

    /// The block in `x`'s floating-point type (the f32 weights are cast to it).
    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let conv3 = |x: &Tensor, w: &Tensor| x.conv2d(w, 1, 1, 1, 1);
        let x = self
            .bn1
            .forward_relu(&conv_in(x, &self.conv1, conv3)?, train)?;
        self.bn2
            .forward_relu(&conv_in(&x, &self.conv2, conv3)?, train)
    }

    fn parameters(&self) -> [&Tensor; 6] {
        [
            &self.conv1,
            &self.bn1.weight,
            &self.bn1.bias,
            &self.conv2,
            &self.bn2.weight,
            &self.bn2.bias,
        ]
    }

    fn batch_norms(&self) -> [&BatchNorm; 2] {
        [&self.bn1, &self.bn2]
    }
}

/// `ConvTranspose2d(a, a/2, 2, stride 2)` → `cat([skip, up], 1)` → DoubleConv.
struct Up {
    weight: Tensor,
    bias: Tensor,
    conv: DoubleConv,
}

impl Up {
    fn new(a: usize, b: usize, vb: VarBuilder) -> Result<Self> {
        // PyTorch computes a transposed conv's fan-in from weight.size(1) · k · k
        let init = torch_uniform(a / 2 * 4);
        Ok(Self {
            weight: vb
                .pp("up")
                .get_with_hints((a, a / 2, 2, 2), "weight", init)?,
            bias: vb.pp("up").get_with_hints(a / 2, "bias", init)?,
            conv: DoubleConv::new(a, b, vb)?,
        })
    }

    fn forward(&self, x: &Tensor, skip: &Tensor, train: bool) -> Result<Tensor> {
        let up = conv_in(x, &self.weight, |x, w| x.conv_transpose2d(w, 0, 0, 2, 1))?
            .broadcast_add(&self.bias.to_dtype(x.dtype())?.reshape((1, (), 1, 1))?)?;
        self.conv.forward(&Tensor::cat(&[skip, &up], 1)?, train)
    }
}

/// A 1×1 convolution from the decoder's maps of one level to logits.
struct Head {
    weight: Tensor,
    bias: Tensor,
}

impl Head {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv_in(x, &self.weight, |x, w| x.conv2d(w, 0, 1, 1, 1))?
            .broadcast_add(&self.bias.to_dtype(x.dtype())?.reshape((1, (), 1, 1))?)
    }
}

/// U-Net of base width f and depth d: `inc`, `down1..down{d}`, `up1` (deepest) `..up{d}`, `head`;
/// with deep supervision also the training-only heads `aux{level}`.
pub struct UNet {
    pub config: UNetConfig,
    inc: DoubleConv,
    downs: Vec<DoubleConv>,
    ups: Vec<Up>,
    head: Head,
    /// Deep supervision's heads with their decoder level, shallowest first.
    aux: Vec<(usize, Head)>,
}

impl UNet {
    /// Builds the module from `vb`. `prior` (π) sets the head's bias to −log((1 − π)/π), the
    /// focal-loss paper's initialisation, so that every output starts at p ≈ π; without it the
    /// bias takes PyTorch's default init.
    pub fn new(config: UNetConfig, prior: Option<f64>, vb: VarBuilder) -> Result<Self> {
        let f = config.base_width;
        let mut blocks = config.blocks().into_iter();
        let double = |b: Block| DoubleConv::new(b.cin, b.cout, vb.pp(&b.name));
        let inc = double(blocks.next().expect("the inc block"))?;
        let downs = blocks
            .by_ref()
            .take(config.depth)
            .map(&double)
            .collect::<Result<_>>()?;
        let ups = blocks
            .map(|b| Up::new(b.cin, b.cout, vb.pp(&b.name)))
            .collect::<Result<_>>()?;
        let head = vb.pp("head");
        let bias_init = match prior {
            Some(p) => Init::Const(-((1.0 - p) / p).ln()),
            None => torch_uniform(f),
        };
        Ok(Self {
            config,
            inc,
            downs,
            ups,
            head: Head {
                weight: head.get_with_hints(
                    (config.classes, f, 1, 1),
                    "weight",
                    torch_uniform(f),
                )?,
                bias: head.get_with_hints(config.classes, "bias", bias_init)?,
            },
            aux: vec![],
        })
    }

    /// Adds deep supervision's heads at [`deep_supervision::levels`] (PyTorch's default init),
    /// created in `vb` after the network's own parameters.
    pub fn with_deep_supervision(mut self, vb: VarBuilder) -> Result<Self> {
        let c = self.config;
        for level in deep_supervision::levels(c.depth) {
            let spec = c.aux_head_spec(&[level]);
            let [(weight, w_shape), (bias, b_shape)] = &spec[..] else {
                unreachable!("a head is a weight and a bias")
            };
            let init = torch_uniform(c.base_width << level);
            let head = Head {
                weight: vb.get_with_hints(w_shape.as_slice(), weight, init)?,
                bias: vb.get_with_hints(b_shape.as_slice(), bias, init)?,
            };
            self.aux.push((level, head));
        }
        Ok(self)
    }

    /// Logits `(N, classes, H, W)` of images `(N, in_channels, H, W)`; H and W divisible by
    /// 2^depth. Runs the fast CPU kernels on the CPU, Candle's ops elsewhere.
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_using(Kernels::for_device(x.device()), x, train)
    }

    /// [`Self::forward`] with a chosen implementation.
    pub fn forward_using(&self, kernels: Kernels, x: &Tensor, train: bool) -> Result<Tensor> {
        self.check_side(x)?;
        match kernels {
            Kernels::Candle => self.forward_generic(x, train),
            Kernels::FastCpu => self.forward_fast(x, train, false).map(|mut o| o.remove(0)),
        }
    }

    fn check_side(&self, x: &Tensor) -> Result<()> {
        let (_, _, h, w) = x.dims4()?;
        let multiple = 1 << self.config.depth;
        if h % multiple != 0 || w % multiple != 0 {
            candle_core::bail!("input {h}x{w} is not divisible by 2^depth = {multiple}");
        }
        Ok(())
    }

    /// The logits and, in training with deep supervision, every auxiliary head's
    /// `(N, classes, H/2^l, W/2^l)` logits (shallowest first), all f32, the pass run in
    /// `dtype` (half precision runs Candle's ops).
    pub fn forward_outputs(
        &self,
        kernels: Kernels,
        x: &Tensor,
        train: bool,
        dtype: DType,
    ) -> Result<Vec<Tensor>> {
        self.check_side(x)?;
        if dtype == DType::F32 && kernels == Kernels::FastCpu {
            return self.forward_fast(x, train, train);
        }
        self.forward_generic_outputs(&x.to_dtype(dtype)?, train, train)?
            .into_iter()
            .map(|t| t.to_dtype(DType::F32))
            .collect()
    }

    /// Mixed precision: the forward (and so the backward) pass in `dtype` (f32, bf16 or f16)
    /// on copies of the f32 weights, BatchNorm in f32, f32 logits. f32 is [`Self::forward`].
    pub fn forward_in(&self, x: &Tensor, train: bool, dtype: DType) -> Result<Tensor> {
        let kernels = Kernels::for_device(x.device());
        Ok(self.forward_outputs(kernels, x, train, dtype)?.remove(0))
    }

    /// The forward pass with Candle's ops (any device), in `x`'s floating-point type.
    fn forward_generic(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_generic_outputs(x, train, false)?.remove(0))
    }

    /// The logits, then (if `aux`) the auxiliary heads' logits, with Candle's ops.
    fn forward_generic_outputs(&self, x: &Tensor, train: bool, aux: bool) -> Result<Vec<Tensor>> {
        let mut skips = vec![self.inc.forward(x, train)?];
        for down in &self.downs {
            let last = skips.last().expect("non-empty");
            // not `max_pool2d`: Candle 0.11's backward of it scales the gradient by 1/4
            let (n, c, h, w) = last.dims4()?;
            let pooled = last.reshape((n, c, h / 2, 2, w / 2, 2))?.max(5)?.max(3)?;
            skips.push(down.forward(&pooled, train)?);
        }
        let mut x = skips.pop().expect("non-empty");
        let mut aux_outputs = vec![];
        for up in &self.ups {
            x = up.forward(&x, &skips.pop().expect("one skip per level"), train)?;
            let level = skips.len();
            if let Some((_, head)) = self.aux.iter().find(|(l, _)| aux && *l == level) {
                aux_outputs.push(head.forward(&x)?);
            }
        }
        // the decoder runs deepest first; the outputs are listed shallowest first
        aux_outputs.reverse();
        let mut outputs = vec![self.head.forward(&x)?];
        outputs.extend(aux_outputs);
        Ok(outputs)
    }

    /// The blocks in network order: `inc`, `down1..`, then the `up` blocks with their
    /// transposed convolution.
    fn blocks(&self) -> impl Iterator<Item = (&DoubleConv, Option<&Up>)> {
        std::iter::once(&self.inc)
            .chain(&self.downs)
            .map(|b| (b, None))
            .chain(self.ups.iter().map(|u| (&u.conv, Some(u))))
    }

    /// The forward pass with the fast CPU kernels: the whole network as one op; the logits,
    /// then (if `aux`) the auxiliary heads' logits.
    fn forward_fast(&self, x: &Tensor, train: bool, aux: bool) -> Result<Vec<Tensor>> {
        let mut params: Vec<Tensor> = vec![];
        for (block, up) in self.blocks() {
            if let Some(u) = up {
                params.push(u.weight.flatten_all()?);
                params.push(u.bias.clone());
            }
            for p in block.parameters() {
                params.push(p.flatten_all()?);
            }
        }
        let aux: &[(usize, Head)] = if aux { &self.aux } else { &[] };
        for head in std::iter::once(&self.head).chain(aux.iter().map(|(_, h)| h)) {
            params.push(head.weight.flatten_all()?);
            params.push(head.bias.clone());
        }
        let packed = Tensor::cat(&params, 0)?;
        let norms: Vec<&BatchNorm> = self.blocks().flat_map(|(b, _)| b.batch_norms()).collect();
        let levels: Vec<usize> = aux.iter().map(|(l, _)| *l).collect();
        let op = if train {
            UNetKernel::train(self.config, BN_EPS, levels.clone())
        } else if !levels.is_empty() {
            candle_core::bail!("the fast CPU op computes the auxiliary heads in training only")
        } else {
            UNetKernel::eval(
                self.config,
                BN_EPS,
                norms.iter().map(|bn| bn.running()).collect::<Result<_>>()?,
            )
        };
        let moments = op.moments();
        let output = x.contiguous()?.apply_op2(&packed, op)?;
        if train {
            let batch = moments.lock().expect("moments lock");
            for (bn, (m, count)) in norms.iter().zip(batch.iter()) {
                let c = m.mean.len();
                let mean = Tensor::from_slice(&m.mean, c, x.device())?;
                let var = Tensor::from_slice(&m.var, c, x.device())?;
                bn.update(&mean, &var, *count)?;
            }
        }
        if levels.is_empty() {
            return Ok(vec![output]);
        }
        // one flat output: the logits, then each auxiliary head's
        let (n, _, h, w) = x.dims4()?;
        let k = self.config.classes;
        let mut start = 0;
        let mut outputs = vec![];
        for side in std::iter::once((h, w)).chain(levels.iter().map(|l| (h >> l, w >> l))) {
            let len = n * k * side.0 * side.1;
            outputs.push(
                output
                    .narrow(0, start, len)?
                    .reshape((n, k, side.0, side.1))?,
            );
            start += len;
        }
        Ok(outputs)
    }
}

/// A fresh, seeded model (with deep supervision's heads if asked) and the `VarMap` that owns
/// its parameters and running statistics. The network's own weights do not depend on
/// `deep_supervision`.
pub fn init(
    config: UNetConfig,
    prior: Option<f64>,
    deep_supervision: bool,
    seed: u64,
    device: &Device,
) -> Result<(UNet, VarMap)> {
    let map = VarMap::new();
    let vb = seeded_var_builder(&map, seed, DType::F32, device);
    let mut model = UNet::new(config, prior, vb.clone())?;
    if deep_supervision {
        model = model.with_deep_supervision(vb)?;
    }
    Ok((model, map))
}

/// Names of the trainable parameters among a state dict's entries.
pub fn is_trainable(name: &str) -> bool {
    !(name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked"))
}
