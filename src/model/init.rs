//! Seeded parameter creation: a `VarBuilder` backend that fills a `VarMap` from a ChaCha RNG, so
//! the same seed gives the same initial weights on every run and device (Candle's own CPU RNG
//! cannot be seeded).

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct SeededInit {
    map: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let mut vars = self.map.data().lock().expect("variable map lock");
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!(
                    "{name}: shape {:?} requested again as {shape:?}",
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let n = shape.elem_count();
        let values: Vec<f32> = match init {
            Init::Const(v) => vec![v as f32; n],
            Init::Uniform { lo, up } => {
                let mut rng = self.rng.lock().expect("rng lock");
                (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
            }
            other => candle_core::bail!("{name}: unsupported initialiser {other:?}"),
        };
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        match self.map.data().lock().expect("variable map lock").get(name) {
            Some(var) => Ok(var.as_tensor().clone()),
            None => candle_core::bail!("{name}: no such parameter"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .expect("variable map lock")
            .contains_key(name)
    }
}

/// A `VarBuilder` that creates every requested parameter in `map` from a seeded RNG.
pub fn seeded_var_builder(
    map: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = SeededInit {
        map: map.clone(),
        rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}
