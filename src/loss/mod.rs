//! Imbalance-aware segmentation losses, chosen per config file.
//!
//! Every loss takes logits `(N, C, H, W)` and a target (see [`LossInput::new`]) and returns a
//! scalar. Each family lives in its own file, documents its formula, defaults and paper, and
//! registers itself with one line in [`REGISTRY`]. [`Loss`] is the weighted sum of the terms
//! of a config's `[[loss]]` tables and also returns each term's unweighted value.

pub mod cross_entropy;
pub mod dice;
pub mod focal;
pub mod fused;
pub mod generalized_dice;
pub mod input;
pub mod quality_focal;
pub mod topk;
pub mod tversky;

use std::fmt;

use anyhow::{anyhow, bail, Context};
use candle_core::{Result, Tensor};
use serde::de::DeserializeOwned;

pub use input::LossInput;

use crate::kernels::Kernels;
use crate::model::Activation;
use crate::toml_util::{explain_de_error, suggest};

/// One loss function with its options, as read from a `[[loss]]` table.
pub trait LossFn: fmt::Debug + Send + Sync {
    /// Checks the options that do not depend on the data (γ ≥ 0, …); the message names the key.
    fn validate(&self) -> std::result::Result<(), String> {
        Ok(())
    }

    /// Checks the options against the number of output channels and the activation (the
    /// length of a per-class list, a sigmoid-only loss, …).
    fn check(&self, _classes: usize, _activation: Activation) -> std::result::Result<(), String> {
        Ok(())
    }

    /// The activation used when the table does not set one.
    fn default_activation(&self, classes: usize) -> Activation {
        Activation::default_for(classes)
    }

    /// The scalar loss.
    fn forward(&self, input: &LossInput) -> Result<Tensor>;

    /// Whether the loss divides by the number of positives ([`LossInput::positives_normaliser`]),
    /// which training replaces by a running average.
    fn normalises_by_positives(&self) -> bool {
        false
    }

    /// The loss as a fused pixel term, for a loss that is a weighted sum over elements
    /// (cross-entropy, focal): lets one fused pass compute it with the other terms' work.
    /// `None` (the default): the loss reads region statistics or takes the generic path.
    fn pixel_term(&self, _input: &LossInput) -> Result<Option<fused::PixelTerm>> {
        Ok(None)
    }
}

/// A registered loss kind: its TOML name and how to build it from the table's options.
pub struct LossKind {
    pub name: &'static str,
    /// One line for `--help` and error messages.
    pub summary: &'static str,
    build: fn(toml::Table) -> std::result::Result<Box<dyn LossFn>, String>,
}

impl LossKind {
    pub const fn new<T: LossFn + DeserializeOwned + 'static>(
        name: &'static str,
        summary: &'static str,
    ) -> Self {
        Self {
            name,
            summary,
            build: build_from_table::<T>,
        }
    }
}

fn build_from_table<T: LossFn + DeserializeOwned + 'static>(
    options: toml::Table,
) -> std::result::Result<Box<dyn LossFn>, String> {
    let loss: T = serde_path_to_error::deserialize(toml::Value::Table(options)).map_err(|e| {
        let message = explain_de_error(&e.inner().to_string(), COMMON_KEYS);
        match e.path().to_string().as_str() {
            "." => message,
            _ if message.starts_with("unknown key") => message,
            key => format!("`{key}`: {message}"),
        }
    })?;
    loss.validate()?;
    Ok(Box::new(loss))
}

/// Every loss kind: adding a loss is one file and one line here.
pub const REGISTRY: &[LossKind] = &[
    cross_entropy::KIND,
    focal::KIND,
    dice::DICE,
    dice::JACCARD,
    tversky::TVERSKY,
    tversky::FOCAL_TVERSKY,
    generalized_dice::KIND,
    quality_focal::KIND,
    topk::KIND,
];

/// Keys every `[[loss]]` table may hold besides the kind's own options.
const COMMON_KEYS: &[&str] = &["kind", "weight", "activation", "ignore_index"];

pub fn kind_names() -> Vec<&'static str> {
    REGISTRY.iter().map(|k| k.name).collect()
}

/// Settings a training config gives once for all terms; a term's own keys win.
#[derive(Debug, Clone, Copy, Default)]
pub struct TermDefaults {
    pub activation: Option<Activation>,
    pub ignore_index: Option<i64>,
}

/// One weighted term of a combined loss.
#[derive(Debug)]
pub struct Term {
    pub kind: &'static str,
    pub weight: f64,
    pub activation: Option<Activation>,
    pub ignore_index: Option<i64>,
    pub loss: Box<dyn LossFn>,
}

impl Term {
    /// Builds a term from one `[[loss]]` table; errors name the table (`loss.1`) and key.
    pub fn from_table(
        index: usize,
        table: &toml::Table,
        defaults: TermDefaults,
    ) -> anyhow::Result<Self> {
        let at = format!("loss.{index}");
        let mut options = table.clone();
        let kind_name = match options.remove("kind") {
            Some(toml::Value::String(s)) => s,
            Some(other) => bail!("{at}.kind: expected a string, found {}", other.type_str()),
            None => bail!(
                "{at}: missing `kind`; valid kinds: {}",
                kind_names().join(", ")
            ),
        };
        let kind = REGISTRY
            .iter()
            .find(|k| k.name == kind_name)
            .ok_or_else(|| {
                anyhow!(
                    "{at}.kind: unknown loss kind `{kind_name}`{}; valid kinds: {}",
                    suggest(&kind_name, &kind_names()),
                    kind_names().join(", ")
                )
            })?;
        let at = format!("{at} (kind = \"{}\")", kind.name);
        let weight = match options.remove("weight") {
            None => 1.0,
            Some(v) => number(&v).ok_or_else(|| {
                anyhow!("{at}: `weight` must be a number, found {}", v.type_str())
            })?,
        };
        check_non_negative("weight", weight, false).map_err(|m| anyhow!("{at}: {m}"))?;
        let activation =
            match options.remove("activation") {
                None => defaults.activation,
                Some(v) => Some(v.try_into::<Activation>().map_err(|_| {
                    anyhow!("{at}: `activation` must be \"sigmoid\" or \"softmax\"")
                })?),
            };
        let ignore_index = match options.remove("ignore_index") {
            None => defaults.ignore_index,
            Some(toml::Value::Integer(i)) => Some(i),
            Some(v) => bail!(
                "{at}: `ignore_index` must be an integer, found {}",
                v.type_str()
            ),
        };
        let loss = (kind.build)(options).map_err(|msg| anyhow!("{at}: {msg}"))?;
        Ok(Self {
            kind: kind.name,
            weight,
            activation,
            ignore_index,
            loss,
        })
    }

    pub fn activation_for(&self, classes: usize) -> Activation {
        self.activation
            .unwrap_or_else(|| self.loss.default_activation(classes))
    }
}

fn number(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Float(f) => Some(*f),
        toml::Value::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

/// A loss and each term's contribution.
pub struct LossValue {
    /// `Σ weight_i · term_i`, a scalar tensor (differentiable).
    pub total: Tensor,
    /// The unweighted value of each term, scalar tensors (differentiable).
    pub terms: Vec<Tensor>,
}

impl LossValue {
    /// `Σ_i w_i · value_i` of the total and of every term (deep supervision's sum over a
    /// model's outputs); the values have the same terms.
    pub fn weighted_sum(parts: &[(f64, LossValue)]) -> Result<LossValue> {
        let Some(((w0, first), rest)) = parts.split_first() else {
            candle_core::bail!("a weighted sum of no loss values");
        };
        let mut total = (&first.total * *w0)?;
        let mut terms = first
            .terms
            .iter()
            .map(|t| t * *w0)
            .collect::<Result<Vec<_>>>()?;
        for (w, v) in rest {
            total = (total + (&v.total * *w)?)?;
            for (sum, t) in terms.iter_mut().zip(&v.terms) {
                *sum = (&*sum + (t * *w)?)?;
            }
        }
        Ok(LossValue { total, terms })
    }
}

/// The weighted sum of the `[[loss]]` terms of a config.
#[derive(Debug)]
pub struct Loss {
    pub terms: Vec<Term>,
}

impl Loss {
    /// Parses the `[[loss]]` tables of a config.
    pub fn from_tables(tables: &[toml::Table], defaults: TermDefaults) -> anyhow::Result<Self> {
        if tables.is_empty() {
            bail!(
                "no [[loss]] table: give at least one, e.g. [[loss]] kind = \"dice\"; valid kinds: {}",
                kind_names().join(", ")
            );
        }
        let terms = tables
            .iter()
            .enumerate()
            .map(|(i, t)| Term::from_table(i, t, defaults))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { terms })
    }

    /// Parses a TOML document that holds `[[loss]]` tables (a training config or a file with
    /// only those tables).
    pub fn from_toml_str(text: &str) -> anyhow::Result<Self> {
        let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| anyhow!("{e}"))?;
        let tables = match doc.get("loss") {
            Some(toml::Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    toml::Value::Table(t) => Ok(t.clone()),
                    _ => Err(anyhow!("loss.{i}: expected a [[loss]] table")),
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
            Some(_) => bail!("`loss` must be an array of [[loss]] tables"),
            None => vec![],
        };
        let defaults = TermDefaults {
            activation: doc
                .get("model")
                .and_then(|m| m.get("activation"))
                .and_then(|a| a.clone().try_into().ok()),
            ignore_index: doc
                .get("data")
                .and_then(|d| d.get("ignore_index"))
                .and_then(|i| i.as_integer()),
        };
        Self::from_tables(&tables, defaults)
    }

    /// Checks every term against the model's number of output channels.
    pub fn check(&self, classes: usize) -> anyhow::Result<()> {
        for (i, term) in self.terms.iter().enumerate() {
            let activation = term.activation_for(classes);
            if activation == Activation::Softmax && classes < 2 {
                bail!(
                    "loss.{i} (kind = \"{}\"): softmax needs at least 2 classes, the model has {classes}",
                    term.kind
                );
            }
            term.loss
                .check(classes, activation)
                .map_err(|msg| anyhow!("loss.{i} (kind = \"{}\"): {msg}", term.kind))?;
        }
        Ok(())
    }

    /// Evaluates every term on `logits` and `target`; inputs prepared for one (activation,
    /// ignore_index) pair are shared by the terms that use it. Uses the fused CPU kernels for
    /// f32 logits on the CPU.
    pub fn forward(&self, logits: &Tensor, target: &Tensor) -> anyhow::Result<LossValue> {
        self.forward_using(logits, target, Kernels::for_device(logits.device()))
    }

    /// [`Self::forward`] for a training step: terms normalised by the positives divide by
    /// `average` after folding this batch's count into it.
    pub fn forward_training(
        &self,
        logits: &Tensor,
        target: &Tensor,
        average: &mut PositivesAverage,
    ) -> anyhow::Result<LossValue> {
        self.evaluate(
            logits,
            target,
            Kernels::for_device(logits.device()),
            Some(average),
        )
    }

    /// [`Self::forward`] with a chosen implementation.
    pub fn forward_using(
        &self,
        logits: &Tensor,
        target: &Tensor,
        kernels: Kernels,
    ) -> anyhow::Result<LossValue> {
        self.evaluate(logits, target, kernels, None)
    }

    fn evaluate(
        &self,
        logits: &Tensor,
        target: &Tensor,
        kernels: Kernels,
        average: Option<&mut PositivesAverage>,
    ) -> anyhow::Result<LossValue> {
        let classes = logits.dims().get(1).copied().unwrap_or(0);
        self.check(classes)?;
        let context = |i: usize| format!("loss.{i} (kind = \"{}\")", self.terms[i].kind);
        // one prepared input per (activation, ignore_index), shared by the terms using it
        let mut prepared: Vec<((Activation, Option<i64>), LossInput)> = vec![];
        let mut input_of = Vec::with_capacity(self.terms.len());
        for (i, term) in self.terms.iter().enumerate() {
            let key = (term.activation_for(classes), term.ignore_index);
            let at = match prepared.iter().position(|(k, _)| *k == key) {
                Some(at) => at,
                None => {
                    let input = crate::cpu::profile::time("loss: prepare input", || {
                        LossInput::new(logits, target, key.0, key.1, kernels)
                    })
                    .with_context(|| context(i))?;
                    prepared.push((key, input));
                    prepared.len() - 1
                }
            };
            input_of.push(at);
        }
        let by_positives: Vec<usize> = (0..self.terms.len())
            .filter(|&i| self.terms[i].loss.normalises_by_positives())
            .map(|i| input_of[i])
            .collect();
        if let (Some(average), Some(&first)) = (average, by_positives.first()) {
            let normaliser = average.update(prepared[first].1.positives()?);
            for &at in &by_positives {
                prepared[at].1.positives_normaliser = Some(normaliser);
            }
        }
        for (at, (_, input)) in prepared.iter_mut().enumerate() {
            if !input.fused {
                continue;
            }
            let mut plan = fused::Request::default();
            for (i, term) in self
                .terms
                .iter()
                .enumerate()
                .filter(|(i, _)| input_of[*i] == at)
            {
                match term.loss.pixel_term(input).with_context(|| context(i))? {
                    Some(p) if !plan.pixel.contains(&p) => plan.pixel.push(p),
                    Some(_) => {}
                    None => plan.stats = true,
                }
            }
            input.plan_fused(plan);
        }
        let mut terms = Vec::with_capacity(self.terms.len());
        let mut total: Option<Tensor> = None;
        for (i, term) in self.terms.iter().enumerate() {
            let value = term
                .loss
                .forward(&prepared[input_of[i]].1)
                .with_context(|| context(i))?;
            let weighted = (&value * term.weight)?;
            total = Some(match total {
                None => weighted,
                Some(t) => (t + weighted)?,
            });
            terms.push(value);
        }
        let total = total.ok_or_else(|| anyhow!("the loss has no term"))?;
        Ok(LossValue { total, terms })
    }
}

/// The running average of the positives per batch that training divides `normalize =
/// "positives"` terms by (detectron2's RetinaNet): `n̄ ← m·n̄ + (1 − m)·max(1, n)`, momentum
/// m = 0.9, started at the first batch's max(1, n) — so a first batch, and any single
/// evaluation, matches the per-batch normalisation. A batch with 0 or 1 positive pixels after
/// batches with thousands divides by about the thousands, not by 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PositivesAverage {
    pub value: Option<f64>,
}

impl PositivesAverage {
    pub const MOMENTUM: f64 = 0.9;

    /// Folds a batch's positives in; returns the divisor for that batch.
    pub fn update(&mut self, positives: f64) -> f64 {
        let n = positives.max(1.0);
        let value = match self.value {
            None => n,
            Some(v) => Self::MOMENTUM * v + (1.0 - Self::MOMENTUM) * n,
        };
        self.value = Some(value);
        value
    }
}

/// Default numerator and denominator smoothing of the region losses (MONAI's 1e-5).
pub fn default_smooth() -> f64 {
    1e-5
}

/// serde default for switches that are on unless set.
pub fn default_true() -> bool {
    true
}

/// `Σ_k w_k Σ_n f_nk / (rows · Σ_k w_k)`: the mean of `(rows, K)` scores, weighted per class.
pub fn class_weighted_mean(scores: &Tensor, class_weights: Option<&[f64]>) -> Result<Tensor> {
    match class_weights {
        None => scores.mean_all(),
        Some(w) => {
            let rows = scores.dims()[0] as f64;
            let total: f64 = w.iter().sum();
            let w = Tensor::new(w, scores.device())?
                .to_dtype(scores.dtype())?
                .unsqueeze(0)?;
            scores.broadcast_mul(&w)?.sum_all()? / (rows * total)
        }
    }
}

/// Checks a per-class list of non-negative weights with a positive sum.
pub fn validate_weights(key: &str, w: &[f64]) -> std::result::Result<(), String> {
    if w.iter().any(|x| !(*x >= 0.0 && *x <= MAX_OPTION)) {
        return Err(format!(
            "`{key}` must hold numbers >= 0 and <= {MAX_OPTION:e}, got {w:?}"
        ));
    }
    if w.iter().sum::<f64>() <= 0.0 {
        return Err(format!("`{key}` must not be all zero"));
    }
    Ok(())
}

/// Checks that a per-class list has one entry per scored class.
pub fn check_len(
    key: &str,
    w: &[f64],
    expected: usize,
    what: &str,
) -> std::result::Result<(), String> {
    if w.len() != expected {
        return Err(format!(
            "`{key}` has {} entries but there are {expected} {what}",
            w.len()
        ));
    }
    Ok(())
}

/// Checks that `value` is finite and ≥ 0 (`strict`: > 0).
pub fn check_non_negative(key: &str, value: f64, strict: bool) -> std::result::Result<(), String> {
    let ok = value <= MAX_OPTION && if strict { value > 0.0 } else { value >= 0.0 };
    if ok {
        Ok(())
    } else {
        let bound = if strict { "> 0" } else { ">= 0" };
        Err(format!(
            "`{key}` must be a number {bound} and <= {MAX_OPTION:e}, got {value}"
        ))
    }
}

/// Largest value of a loss option or term weight: every option must stay far inside f32
/// (3.4·10³⁸), where the losses compute, so that no value passes the check and then
/// overflows.
pub const MAX_OPTION: f64 = 1e6;
