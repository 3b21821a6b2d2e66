//! `capivara-train`: CAPIVARA's LiT + LoRA fine-tuning (work in progress: the
//! subcommands below are planned; see the project's issues).

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
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
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
}
