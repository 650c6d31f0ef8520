//! segtrain: a U-Net segmentation trainer on Candle with imbalance-aware losses.
//!
//! Data flows one way: [`config`] → data → model → [`loss`] → train → metrics / export; the
//! [`cli`] commands sit on top.

pub mod bench;
pub mod calibrate;
pub mod cli;
pub mod compare;
pub mod config;
pub mod cpu;
pub mod data;
pub mod device;
pub mod distributed;
pub mod export;
pub mod fsutil;
pub mod import;
pub mod inference;
pub mod kernels;
pub mod loss;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod predict;
pub mod report;
pub mod rules;
pub mod score;
pub mod stats;
pub mod toml_util;
pub mod train;
