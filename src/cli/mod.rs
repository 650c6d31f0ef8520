//! The commands behind `segtrain`'s subcommands; `main.rs` only parses arguments.

pub mod loss;
