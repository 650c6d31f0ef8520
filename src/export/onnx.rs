//! ONNX export: the network of a model file as an ONNX graph, derived from the one description
//! of its topology ([`UNetConfig::blocks`]) and written with the ONNX protobuf types of
//! `tract-onnx` (prost).
//!
//! Graph: input `image` (N × C × H × W, float32, the raw intensities in [0, 1] as `predict`
//! reads them: 8-bit / 255); the model's normalisation where it can be written as ONNX ops
//! (`dataset`: (x − μ_c) / σ_c; `image`: (x − mean) / max(std, 10⁻³) over each image's channel)
//! — not percentile clipping, which is then stated in `metadata_props` only
//! (`normalization_in_graph = false`); per block Conv 3×3 with its BatchNorm folded in
//! (W' = W·γ/√(σ² + ε), b' = β − μ·γ/√(σ² + ε)) and Relu, twice; MaxPool 2×2 before a `down`
//! block, ConvTranspose 2×2 stride 2 and Concat(skip, up) before an `up` block; the 1×1 head.
//! Output `logits`, or with the activation `probabilities` (Sigmoid, or Softmax over the
//! classes; logits divided by the model's temperature first). N, H and W are dynamic; H and W
//! must be multiples of 2^depth (otherwise pooling floors a side and the Concat of an `up`
//! block fails at run time with a shape error). `--dtype f16` stores the weights and computes
//! in half precision between a Cast after the input and one before the output (input and
//! output stay float32).

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor};
use prost::Message;
use tract_onnx::pb;

use super::ModelMeta;
use crate::data::Normalization;
use crate::model::{Activation, BlockKind, BN_EPS};

/// The opsets written: 13 (Softmax over one axis) to 21.
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;

/// How the graph is written.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OnnxOptions {
    /// The ONNX opset ([`OPSETS`]; default 17).
    pub opset: i64,
    /// End with Sigmoid/Softmax (output `probabilities`) instead of `logits`.
    pub activation: bool,
    /// Weights and arithmetic in float16.
    pub half: bool,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        OnnxOptions {
            opset: 17,
            activation: false,
            half: false,
        }
    }
}

/// The ONNX model (serialised protobuf) of a model file's `tensors` and `meta`.
pub fn to_onnx(
    tensors: &HashMap<String, Tensor>,
    meta: &ModelMeta,
    opts: OnnxOptions,
) -> Result<Vec<u8>> {
    if !OPSETS.contains(&opts.opset) {
        bail!(
            "--opset {}: segtrain writes opsets {} to {}",
            opts.opset,
            OPSETS.start(),
            OPSETS.end()
        );
    }
    let weight = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let t = tensors
            .get(name)
            .ok_or_else(|| anyhow!("the model has no `{name}`"))?;
        Ok((
            t.dims().to_vec(),
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        ))
    };
    let mut g = Graph {
        half: opts.half,
        opset: opts.opset,
        ..Graph::default()
    };
    let mut x = "image".to_string();
    if opts.half {
        x = g.node("Cast", &[&x], vec![int("to", F16)]);
    }
    let in_graph = meta.normalizer.clip.is_none();
    if in_graph {
        x = g.normalize(&x, meta)?;
    }
    let mut skips = vec![];
    for block in meta.unet.blocks() {
        match block.kind {
            BlockKind::Inc => {}
            BlockKind::Down => {
                skips.push(x.clone());
                let pool = [ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])];
                x = g.node("MaxPool", &[&x], pool.to_vec());
            }
            BlockKind::Up => {
                let (ws, w) = weight(&format!("{}.up.weight", block.name))?;
                let (bs, b) = weight(&format!("{}.up.bias", block.name))?;
                let (w, b) = (g.constant(&ws, w), g.constant(&bs, b));
                let up = [ints("kernel_shape", &[2, 2]), ints("strides", &[2, 2])];
                x = g.node("ConvTranspose", &[&x, &w, &b], up.to_vec());
                let skip = skips.pop().expect("one skip per up block");
                x = g.node("Concat", &[&skip, &x], vec![int("axis", 1)]);
            }
        }
        for i in [1, 2] {
            let (shape, w) = weight(&format!("{}.conv{i}.weight", block.name))?;
            let bn = |stat: &str| weight(&format!("{}.bn{i}.{stat}", block.name)).map(|w| w.1);
            let (gamma, beta, mean, var) = (
                bn("weight")?,
                bn("bias")?,
                bn("running_mean")?,
                bn("running_var")?,
            );
            let per_out = w.len() / shape[0];
            let scale: Vec<f64> = (0..shape[0])
                .map(|o| f64::from(gamma[o]) / (f64::from(var[o]) + BN_EPS).sqrt())
                .collect();
            let folded: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(j, &v)| (f64::from(v) * scale[j / per_out]) as f32)
                .collect();
            let bias: Vec<f32> = (0..shape[0])
                .map(|o| (f64::from(beta[o]) - f64::from(mean[o]) * scale[o]) as f32)
                .collect();
            let (w, b) = (g.constant(&shape, folded), g.constant(&[shape[0]], bias));
            let conv = [ints("kernel_shape", &[3, 3]), ints("pads", &[1, 1, 1, 1])];
            x = g.node("Conv", &[&x, &w, &b], conv.to_vec());
            x = g.node("Relu", &[&x], vec![]);
        }
    }
    let (ws, w) = weight("head.weight")?;
    let (bs, b) = weight("head.bias")?;
    let (w, b) = (g.constant(&ws, w), g.constant(&bs, b));
    x = g.node("Conv", &[&x, &w, &b], vec![ints("kernel_shape", &[1, 1])]);
    if opts.activation {
        if meta.temperature != 1.0 {
            let t = g.constant(&[], vec![meta.temperature as f32]);
            x = g.node("Div", &[&x, &t], vec![]);
        }
        x = match meta.activation {
            Activation::Sigmoid => g.node("Sigmoid", &[&x], vec![]),
            Activation::Softmax => g.node("Softmax", &[&x], vec![int("axis", 1)]),
        };
    }
    if opts.half {
        x = g.node("Cast", &[&x], vec![int("to", F32)]);
    }
    let output = if opts.activation {
        "probabilities"
    } else {
        "logits"
    };
    g.node_named("Identity", &[&x], vec![], output);

    let u = &meta.unet;
    let tensor_type = |name: &str, channels: usize| pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: F32 as i32,
                shape: Some(pb::TensorShapeProto {
                    dim: [
                        dim_param("batch"),
                        dim_value(channels),
                        dim_param("height"),
                        dim_param("width"),
                    ]
                    .to_vec(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let graph = pb::GraphProto {
        name: "segtrain_unet".into(),
        node: g.nodes,
        initializer: g.initializers,
        input: vec![tensor_type("image", u.in_channels)],
        output: vec![tensor_type(output, u.classes)],
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: opts.opset,
        }],
        producer_name: "segtrain".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: metadata(meta, in_graph, opts)?
            .into_iter()
            .map(|(key, value)| pb::StringStringEntryProto { key, value })
            .collect(),
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

/// What a user of the file needs beyond the graph: how to prepare its input and read its
/// output, and where it came from.
fn metadata(meta: &ModelMeta, in_graph: bool, opts: OnnxOptions) -> Result<Vec<(String, String)>> {
    let u = &meta.unet;
    let n = &meta.normalizer;
    let side = 1usize << u.depth;
    let mut props = vec![
        ("segtrain_version".into(), env!("CARGO_PKG_VERSION").into()),
        (
            "input".into(),
            format!(
                "image: N × {} × H × W float32, raw intensities in [0, 1] (8-bit / 255); H and W multiples of {side}",
                u.in_channels
            ),
        ),
        (
            "output".into(),
            match (opts.activation, meta.activation) {
                (false, _) => format!("logits: N × {} × H × W", u.classes),
                (true, Activation::Sigmoid) => format!(
                    "probabilities: N × {} × H × W, sigmoid(logits / {}) per class; foreground where > 0.5",
                    u.classes, meta.temperature
                ),
                (true, Activation::Softmax) => format!(
                    "probabilities: N × {} × H × W, softmax(logits / {}) over the classes; label = argmax",
                    u.classes, meta.temperature
                ),
            },
        ),
        ("normalization_in_graph".into(), in_graph.to_string()),
        (
            "normalization".into(),
            format!(
                "{}; clip_percentiles {}; dataset mean {:?}, std {:?}",
                match n.mode {
                    Normalization::Dataset => "dataset: x' = (x - mean_c) / std_c",
                    Normalization::Image => "image: x' = (x - mean_c(image)) / max(std_c(image), 1e-3)",
                },
                serde_json::to_string(&n.clip)?,
                n.mean,
                n.std
            ),
        ),
        ("activation".into(), meta.activation.name().into()),
        ("temperature".into(), meta.temperature.to_string()),
        ("classes".into(), u.classes.to_string()),
        ("window".into(), serde_json::to_string(&meta.window)?),
        ("config".into(), meta.config.clone()),
    ];
    if let Some(s) = &meta.slicing {
        props.push(("import".into(), serde_json::to_string(s)?));
    }
    Ok(props)
}

const F32: i64 = pb::tensor_proto::DataType::Float as i64;
const F16: i64 = pb::tensor_proto::DataType::Float16 as i64;

/// Nodes and initializers under construction; each node's output gets a fresh name.
#[derive(Default)]
struct Graph {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    half: bool,
    opset: i64,
}

impl Graph {
    /// Appends a node of `op` and returns the name of its output.
    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<pb::AttributeProto>) -> String {
        let name = format!("{}_{}", op.to_lowercase(), self.nodes.len());
        self.node_named(op, inputs, attrs, &name);
        name
    }

    fn node_named(
        &mut self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<pb::AttributeProto>,
        output: &str,
    ) {
        self.nodes.push(pb::NodeProto {
            name: output.into(),
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute: attrs,
            ..Default::default()
        });
    }

    /// A constant tensor of `shape` (float16 where the graph computes in half precision).
    fn constant(&mut self, shape: &[usize], values: Vec<f32>) -> String {
        let name = format!("w{}", self.initializers.len());
        let dims = shape.iter().map(|&d| d as i64).collect();
        let tensor = if self.half {
            let raw = values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect();
            pb::TensorProto {
                name: name.clone(),
                dims,
                data_type: F16 as i32,
                raw_data: raw,
                ..Default::default()
            }
        } else {
            pb::TensorProto {
                name: name.clone(),
                dims,
                data_type: F32 as i32,
                float_data: values,
                ..Default::default()
            }
        };
        self.initializers.push(tensor);
        name
    }

    /// The model's normalisation of `x` (no clipping): per channel with the data set's
    /// statistics, or each image channel's own mean and standard deviation (population,
    /// floored at 10⁻³, as [`crate::data::Normalizer`]).
    fn normalize(&mut self, x: &str, meta: &ModelMeta) -> Result<String> {
        let n = &meta.normalizer;
        let c = meta.unet.in_channels;
        Ok(match n.mode {
            Normalization::Dataset => {
                let mean = self.constant(&[1, c, 1, 1], n.mean.clone());
                let std = self.constant(&[1, c, 1, 1], n.std.clone());
                let centred = self.node("Sub", &[x, &mean], vec![]);
                self.node("Div", &[&centred, &std], vec![])
            }
            Normalization::Image => {
                let mean = self.mean_over_pixels(x);
                let square = self.node("Mul", &[x, x], vec![]);
                let mean_square = self.mean_over_pixels(&square);
                let mean_sq = self.node("Mul", &[&mean, &mean], vec![]);
                let var = self.node("Sub", &[&mean_square, &mean_sq], vec![]);
                let zero = self.constant(&[], vec![0.0]);
                let var = self.node("Max", &[&var, &zero], vec![]);
                let std = self.node("Sqrt", &[&var], vec![]);
                let floor = self.constant(&[], vec![crate::data::intensity::MIN_STD]);
                let std = self.node("Max", &[&std, &floor], vec![]);
                let centred = self.node("Sub", &[x, &mean], vec![]);
                self.node("Div", &[&centred, &std], vec![])
            }
        })
    }

    /// The mean over H and W of each image and channel (kept as N × C × 1 × 1); the axes are an
    /// attribute before opset 18 and an input from it.
    fn mean_over_pixels(&mut self, x: &str) -> String {
        let keep = int("keepdims", 1);
        if self.opset < 18 {
            return self.node("ReduceMean", &[x], vec![ints("axes", &[2, 3]), keep]);
        }
        let name = format!("axes{}", self.initializers.len());
        self.initializers.push(pb::TensorProto {
            name: name.clone(),
            dims: vec![2],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            int64_data: vec![2, 3],
            ..Default::default()
        });
        self.node("ReduceMean", &[x, &name], vec![keep])
    }
}

fn int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn dim_param(name: &str) -> pb::tensor_shape_proto::Dimension {
    pb::tensor_shape_proto::Dimension {
        value: Some(pb::tensor_shape_proto::dimension::Value::DimParam(
            name.into(),
        )),
        ..Default::default()
    }
}

fn dim_value(n: usize) -> pb::tensor_shape_proto::Dimension {
    pb::tensor_shape_proto::Dimension {
        value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(n as i64)),
        ..Default::default()
    }
}
