//! segtrain: a U-Net segmentation trainer on Candle with imbalance-aware losses.
//!
//! Data flows one way: [`config`] → data → model → [`loss`] → train → metrics / export.

pub mod config;
pub mod loss;
