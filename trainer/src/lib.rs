//! `capivara-trainer`: CAPIVARA's LiT + LoRA fine-tuning on the model code of
//! the `capivara` crate. The `capivara-train` binary is its command line.
//!
//! - [`data`]: webdataset shards and TSV files;
//! - [`features`]: the frozen image tower's embeddings, computed once (LiT);
//! - [`dataset`]: features joined with captions, and each step's batch;
//! - [`model`]: the CLIP with LoRA adapters and its trainable tensors;
//! - [`loss`]: the symmetric contrastive loss and GradCache;
//! - [`optim`]: Adam(W) and the cosine schedule with warm-up;
//! - [`run`]: run and model directories (file names, checkpoints, metrics,
//!   atomic writes) and the plumbing the commands share;
//! - [`fit`]: the training loop, checkpoints and resume;
//! - [`merge`]: LoRA folded into the base weights, written as a model directory;
//! - [`eval`]: retrieval recall and zero-shot accuracy;
//! - [`synth`]: a synthetic captioned dataset to try all of it;
//! - [`prune`]: vocabulary pruning to the tokens a corpus uses;
//! - [`student`]: the smaller text tower `distill` trains, and its start from
//!   the teacher;
//! - [`distill`]: a smaller text tower distilled from the teacher (DC-CLIP);
//! - [`caption`]: synthetic captions (BLIP) and their translation (Marian)
//!   written into new shards.
//!
//! Imports between the modules (`a -> b`: `a` uses `b`) run one way, no loop
//! (unit tests aside: `data`'s write their shards with `synth`):
//!
//! ```text
//! distill -> student, eval, run, loss, optim, dataset, data
//! fit     -> eval, run, loss, optim, dataset, model
//! student -> run, dataset, model
//! eval    -> run, dataset, features, data
//! merge -> run     prune -> run     run -> model     loss -> model
//! dataset -> features, data         features -> data
//! caption -> run, data
//! model, optim, data, synth: none
//! ```

pub mod caption;
pub mod data;
pub mod dataset;
pub mod distill;
pub mod eval;
pub mod features;
pub mod fit;
pub mod loss;
pub mod merge;
pub mod model;
pub mod optim;
pub mod prune;
pub mod run;
pub mod student;
pub mod synth;
