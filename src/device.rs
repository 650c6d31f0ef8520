//! Choosing the compute device: `auto`, `cpu`, `cuda[:N]` or `metal`, with messages that say
//! what this build supports and what the machine has.

use anyhow::{anyhow, bail, Result};
use candle_core::Device;

/// A device as named on the command line or in `train.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA if this build has it and a GPU answers (a data-parallel rank's own, by its local
    /// rank), then Metal, then the CPU.
    Auto,
    Cpu,
    Cuda(usize),
    Metal,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            // a rank of a data-parallel job takes its own GPU
            "cuda" | "gpu" => Ok(Self::Cuda(crate::distributed::local_rank())),
            "metal" | "mps" => Ok(Self::Metal),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| {
                    anyhow!("`{other}`: the CUDA ordinal must be a number, e.g. cuda:0")
                }),
                None => bail!("unknown device `{other}`; use auto, cpu, cuda, cuda:N or metal"),
            },
        }
    }

    /// Opens the device. Returns it with a one-line description of the choice.
    pub fn open(self) -> Result<(Device, String)> {
        match self {
            Self::Cpu => Ok((Device::Cpu, "cpu".into())),
            Self::Cuda(n) => {
                if !cfg!(feature = "cuda") {
                    bail!(
                        "CUDA requested, but this segtrain was built without CUDA support; \
                         rebuild with `cargo build --release --features cuda` (needs the CUDA toolkit)"
                    );
                }
                Device::new_cuda(n)
                    .map(|d| (d, format!("cuda:{n}")))
                    .map_err(|e| anyhow!("CUDA device {n} is not usable: {e}"))
            }
            Self::Metal => {
                if !cfg!(feature = "metal") {
                    bail!(
                        "Metal requested, but this segtrain was built without Metal support; \
                         rebuild on macOS with `cargo build --release --features metal`"
                    );
                }
                Device::new_metal(0)
                    .map(|d| (d, "metal".into()))
                    .map_err(|e| anyhow!("the Metal device is not usable: {e}"))
            }
            Self::Auto => {
                let mut tried = vec![];
                if cfg!(feature = "cuda") {
                    let n = crate::distributed::local_rank();
                    match Device::new_cuda(n) {
                        Ok(d) => return Ok((d, format!("cuda:{n} (auto)"))),
                        Err(e) => tried.push(format!("CUDA: {e}")),
                    }
                } else {
                    tried.push("CUDA: not in this build".into());
                }
                if cfg!(feature = "metal") {
                    match Device::new_metal(0) {
                        Ok(d) => return Ok((d, "metal (auto)".into())),
                        Err(e) => tried.push(format!("Metal: {e}")),
                    }
                } else {
                    tried.push("Metal: not in this build".into());
                }
                Ok((Device::Cpu, format!("cpu (auto; {})", tried.join("; "))))
            }
        }
    }
}
