//! The `capivara` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::DType;
use clap::{Parser, Subcommand};

use capivara::model::weights::DEFAULT_MODEL;
use capivara::{Error, Pipeline};

#[derive(Parser)]
#[command(
    name = "capivara",
    version,
    about = "Zero-shot image classification and search with multilingual CLIP (CAPIVARA)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print L2-normalised embeddings of texts and images as one JSON object.
    Embed(EmbedArgs),
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// Model: a local directory or a Hugging Face repo id.
    #[arg(long, env = "CAPIVARA_MODEL", default_value = DEFAULT_MODEL)]
    model: String,
    /// A text to embed (repeatable).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// An image file to embed (repeatable).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "CAPIVARA_DEVICE", default_value = "cpu")]
    device: String,
    /// Weights dtype: f32, f16 or bf16 (f32 is fastest on CPU).
    #[arg(long, env = "CAPIVARA_DTYPE", default_value = "f32")]
    dtype: String,
}

#[derive(serde::Serialize)]
struct EmbedOutput<'a> {
    model: &'a str,
    dim: usize,
    texts: Vec<Vec<f32>>,
    images: Vec<Vec<f32>>,
}

fn parse_dtype(s: &str) -> Result<DType, Error> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        _ => Err(Error::InvalidArgument(format!(
            "unknown dtype `{s}` (f32, f16, bf16)"
        ))),
    }
}

fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    let device = capivara::parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    // Read every image before loading the model: a bad path fails fast.
    let images = args
        .images
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pipeline = Pipeline::load(&args.model, &device, dtype)?;
    let texts = pipeline.embed_texts(&args.texts)?.to_vec2::<f32>()?;
    let mut image_embs = Vec::with_capacity(images.len());
    for (bytes, path) in images.iter().zip(&args.images) {
        let e = pipeline
            .embed_images(std::slice::from_ref(bytes))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        image_embs.extend(e.to_vec2::<f32>()?);
    }
    let out = EmbedOutput {
        model: &args.model,
        dim: pipeline.clip.embed_dim(),
        texts,
        images: image_embs,
    };
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &out)?;
    writeln!(stdout)?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Embed(args) => embed(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined.
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
