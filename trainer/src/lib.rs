//! `capivara-trainer`: CAPIVARA's LiT + LoRA fine-tuning on the model code of
//! the `capivara` crate. The `capivara-train` binary is its command line.

pub mod data;
pub mod features;
