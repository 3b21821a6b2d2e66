//! `capivara-train`: CAPIVARA's LiT + LoRA fine-tuning (work in progress: the
//! subcommands below are planned; see the project's issues).

use capivara_trainer::data;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capivara-train",
    version,
    about = "LiT + LoRA fine-tuning of CAPIVARA models; writes merged weights `capivara serve` loads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the LoRA configuration CAPIVARA's recipe uses.
    Recipe,
    /// Embed every image of the shards once with the frozen image tower (LiT):
    /// `OUT/<shard>.safetensors` + `OUT/<shard>.keys.json` per shard.
    Features {
        /// Model: a local directory or a Hugging Face repo id.
        #[arg(long, default_value = capivara::model::weights::DEFAULT_MODEL)]
        model: String,
        /// Shards, with brace ranges: 'data/{00000..00165}.tar' (repeatable).
        #[arg(long, required = true)]
        shards: Vec<String>,
        /// Output directory.
        #[arg(long)]
        out: std::path::PathBuf,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Images per forward pass.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
    },
    /// Read a dataset (webdataset shards and/or TSV files) and report what it
    /// holds and what would be skipped, as JSON.
    Inspect {
        /// Shards, with brace ranges: 'data/{00000..00165}.tar' (repeatable).
        #[arg(long)]
        shards: Vec<String>,
        /// TSV files of `image_path<TAB>caption` (repeatable).
        #[arg(long)]
        tsv: Vec<std::path::PathBuf>,
    },
}

fn inspect(shards: &[String], tsv: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let mut skipped = data::Skipped::default();
    let (mut samples, mut captions, mut generated, mut files) = (0usize, 0usize, 0usize, 0usize);
    let mut count = |(s, k): (Vec<data::Sample>, data::Skipped)| {
        files += 1;
        samples += s.len();
        captions += s.iter().map(|x| x.captions.len()).sum::<usize>();
        generated += s.iter().map(|x| x.generated.len()).sum::<usize>();
        skipped.add(&k);
    };
    for pattern in shards {
        for shard in data::expand_braces(pattern).map_err(anyhow::Error::msg)? {
            count(data::read_shard(std::path::Path::new(&shard)));
        }
    }
    for t in tsv {
        count(data::read_tsv(t));
    }
    if files == 0 {
        anyhow::bail!("give --shards or --tsv");
    }
    println!(
        "{}",
        serde_json::json!({
            "files": files,
            "samples": samples,
            "captions": captions,
            "generated_captions": generated,
            "skipped": skipped.total(),
            "skipped_no_image": skipped.no_image,
            "skipped_no_caption": skipped.no_caption,
            "unreadable_files": skipped.unreadable,
        })
    );
    Ok(())
}

fn features(
    model: &str,
    shards: &[String],
    out: &std::path::Path,
    device: &str,
    batch: usize,
) -> anyhow::Result<()> {
    use capivara_trainer::features::{shard_name, write_features};
    let device = capivara::parse_device(device)?;
    let pipeline = capivara::Pipeline::load(model, &device, candle_core::DType::F32)?;
    let mut total = capivara_trainer::features::FeatureStats::default();
    let started = std::time::Instant::now();
    for pattern in shards {
        for shard in data::expand_braces(pattern).map_err(anyhow::Error::msg)? {
            let path = std::path::Path::new(&shard);
            let (samples, skipped) = data::read_shard(path);
            let s = write_features(&pipeline, &samples, batch, out, &shard_name(path))?;
            eprintln!(
                "{shard}: {} embedded, {} undecodable, {} skipped",
                s.embedded,
                s.undecodable,
                skipped.total()
            );
            total.embedded += s.embedded;
            total.undecodable += s.undecodable;
            total.skipped.add(&skipped);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "embedded": total.embedded,
            "undecodable": total.undecodable,
            "skipped": total.skipped.total(),
            "seconds": secs,
            "images_per_second": total.embedded as f64 / secs.max(1e-9),
        })
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Features {
            model,
            shards,
            out,
            device,
            batch_size,
        } => {
            if let Err(e) = features(&model, &shards, &out, &device, batch_size) {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
        Command::Inspect { shards, tsv } => {
            if let Err(e) = inspect(&shards, &tsv) {
                eprintln!("error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        }
        Command::Recipe => {
            let cfg = capivara::model::lora::LoraConfig::default();
            println!(
                "LoRA r={} alpha={} dropout={} targets={}",
                cfg.rank,
                cfg.alpha,
                cfg.dropout,
                cfg.targets.join(",")
            );
        }
    }
    std::process::ExitCode::SUCCESS
}
