//! The `capivara` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use capivara::resolve::DEFAULT_MODEL;
use capivara::Pipeline;

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
    /// Serve zero-shot classification and image search over HTTP.
    #[cfg(feature = "server")]
    Serve(Box<ServeArgs>),
    /// Print L2-normalised embeddings of texts and images as one JSON object.
    Embed(EmbedArgs),
    /// Measure the towers' throughput in this process (after a warm-up) and
    /// print one JSON object.
    Bench(BenchArgs),
    /// Download models from the Hugging Face hub into its cache ahead of
    /// time (the newest revision; files already cached are not fetched
    /// again) and print what was fetched as one JSON object.
    Pull(PullArgs),
    /// List the models in the Hugging Face hub cache, with their sizes.
    Models(ModelsArgs),
    /// Print the OpenAPI document of the HTTP API (openapi/openapi.json).
    #[cfg(feature = "server")]
    Openapi,
    /// Ingest folders of images and webdataset shards into the index: a data
    /// directory (not while a server uses it) or Postgres (--index-url).
    #[cfg(feature = "server")]
    Index(IndexArgs),
    /// Move an index between a data directory and Postgres, either way,
    /// without re-embedding (vectors, metadata, thumbnails, the model's
    /// fingerprint).
    #[cfg(feature = "server")]
    Migrate(MigrateArgs),
}

/// Where the index lives, for `serve` and `index`.
#[cfg(feature = "server")]
#[derive(clap::Args)]
struct StoreArgs {
    /// The data directory (created if missing): the embedded index, its log,
    /// snapshots and thumbnails.
    #[arg(long, env = "CAPIVARA_DATA_DIR", default_value = "./capivara-data")]
    data_dir: PathBuf,
    /// `postgres://user:password@host:port/db?sslmode=...`: keep the index in
    /// Postgres + pgvector instead of --data-dir; any number of processes may
    /// share it. `sslmode` as libpq: disable, prefer, require, verify-ca,
    /// verify-full (with `sslrootcert=FILE`).
    #[arg(long, env = "CAPIVARA_INDEX_URL", hide_env_values = true)]
    index_url: Option<String>,
    /// HNSW links per node (default: 24 embedded, 16 in Postgres; Postgres
    /// uses it when it creates the index).
    #[arg(long, env = "CAPIVARA_HNSW_M")]
    hnsw_m: Option<usize>,
    /// HNSW candidate list while building (default: 200 embedded, 64 Postgres).
    #[arg(long, env = "CAPIVARA_HNSW_EF_CONSTRUCTION")]
    hnsw_ef_construction: Option<usize>,
    /// HNSW candidate list while searching, at least k (default: 128
    /// embedded, 200 Postgres).
    #[arg(long, env = "CAPIVARA_HNSW_EF_SEARCH")]
    hnsw_ef_search: Option<usize>,
    /// Postgres column type of a new index: `vector` (4 bytes a dimension)
    /// or `halfvec` (2 bytes; scores from f16-rounded vectors).
    #[arg(long, env = "CAPIVARA_INDEX_STORAGE", default_value = "vector")]
    index_storage: String,
    /// Connections to Postgres per process.
    #[arg(long, env = "CAPIVARA_INDEX_POOL_SIZE", default_value_t = 16)]
    index_pool_size: usize,
    /// Postgres `maintenance_work_mem` for building the HNSW index, in MiB
    /// (about 2.5 GiB holds the graph of 1M 512-d vectors).
    #[arg(long, env = "CAPIVARA_INDEX_BUILD_MEMORY_MB", default_value_t = 1024)]
    index_build_memory_mb: usize,
}

#[cfg(feature = "server")]
impl StoreArgs {
    /// The index's location and its tuning, checked.
    fn parse(&self) -> anyhow::Result<(capivara::store::Location, capivara::store::OpenOptions)> {
        let location =
            capivara::store::Location::from_flags(&self.data_dir, self.index_url.as_deref())?;
        let mut opts = capivara::store::OpenOptions::default();
        if let Some(m) = self.hnsw_m {
            anyhow::ensure!((2..=100).contains(&m), "--hnsw-m must be 2 to 100");
            opts.hnsw.max_nb_connection = m;
            opts.pg.m = m;
        }
        if let Some(ef) = self.hnsw_ef_construction {
            anyhow::ensure!(ef >= 4, "--hnsw-ef-construction must be at least 4");
            opts.hnsw.ef_construction = ef;
            opts.pg.ef_construction = ef;
        }
        if let Some(ef) = self.hnsw_ef_search {
            anyhow::ensure!(
                (1..=1000).contains(&ef),
                "--hnsw-ef-search must be 1 to 1000"
            );
            opts.hnsw.ef_search = ef;
            opts.pg.ef_search = ef;
        }
        opts.pg.storage = self
            .index_storage
            .parse()
            .map_err(|e| anyhow::anyhow!("--index-storage: {e}"))?;
        anyhow::ensure!(
            self.index_pool_size > 0,
            "--index-pool-size must be at least 1"
        );
        opts.pg.pool_size = self.index_pool_size;
        opts.pg.build_memory_mb = self.index_build_memory_mb;
        Ok((location, opts))
    }
}

/// The model flags every command shares, and their one loader.
#[derive(clap::Args)]
struct ModelArgs {
    /// Model: a local directory or a Hugging Face repo id. `capivara serve`
    /// takes several (repeat the flag, or separate with commas in the env
    /// var), each `NAME=DIR_OR_HUB_ID` or bare; the first is the default.
    #[arg(long, env = "CAPIVARA_MODEL", default_value = DEFAULT_MODEL, value_delimiter = ',')]
    model: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "CAPIVARA_DEVICE", default_value = "cpu")]
    device: String,
    /// Weights dtype: f32, f16 or bf16. On a CPU, bf16 runs the linear
    /// layers on AVX-512 BF16 (f32 accumulation), or f32 with a warning
    /// where the CPU lacks it.
    #[arg(long, env = "CAPIVARA_DTYPE", default_value = "f32")]
    dtype: String,
    /// `int8`: int8 weights and activations in the encoders' linear layers
    /// (CPU with AVX-512 VNNI; ~2.7-3.2x faster, embeddings within cosine
    /// 0.99 of f32), or `none`. An index must be searched with embeddings
    /// of the setting it was built with.
    #[arg(long, env = "CAPIVARA_QUANTIZE", default_value = "none")]
    quantize: String,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 scale inside libjpeg before
    /// the resize, as Pillow does after `im.draft("RGB", (2*S, 2*S))` (S the
    /// model's input size): ~1.4x faster indexing of phone photos (int8);
    /// embeddings then match open_clip on so drafted images, no longer the
    /// plain transform's bit for bit.
    #[arg(long, env = "CAPIVARA_JPEG_DRAFT")]
    jpeg_draft: bool,
}

/// What the model flags say, checked.
struct ModelChoice {
    /// The first `--model` (the only one outside `serve`).
    model: String,
    /// Every `--model`.
    all: Vec<String>,
    device: candle_core::Device,
    dtype: candle_core::DType,
    quantization: capivara::model::Quantization,
    jpeg_draft: bool,
}

impl ModelArgs {
    /// Checks the flags (before any slow work).
    fn parse(&self) -> anyhow::Result<ModelChoice> {
        let all: Vec<String> = self
            .model
            .iter()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        anyhow::ensure!(!all.is_empty(), "--model: no model given");
        Ok(ModelChoice {
            model: all[0].clone(),
            all,
            device: capivara::parse_device(&self.device)?,
            dtype: capivara::parse_dtype(&self.dtype)?,
            quantization: self.quantize.parse()?,
            jpeg_draft: self.jpeg_draft,
        })
    }
}

impl ModelChoice {
    /// The one model of a command that takes one.
    fn single(&self) -> anyhow::Result<&str> {
        anyhow::ensure!(
            self.all.len() == 1,
            "--model: this command takes one model (several are for `capivara serve`)"
        );
        let m = self.model.as_str();
        Ok(m.split_once('=').map(|(_, src)| src).unwrap_or(m))
    }

    fn load(&self) -> anyhow::Result<Pipeline> {
        let model = self.single()?;
        let mut pipeline = Pipeline::load_with(model, &self.device, self.dtype, self.quantization)?;
        pipeline.preprocessor = pipeline
            .preprocessor
            .clone()
            .with_jpeg_draft(self.jpeg_draft);
        Ok(pipeline)
    }
}

#[cfg(feature = "server")]
#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, env = "CAPIVARA_ADDR", default_value = "127.0.0.1:8080")]
    addr: std::net::SocketAddr,
    /// The model whose embeddings the index holds (a --model name; default:
    /// the first).
    #[arg(long, env = "CAPIVARA_INDEX_MODEL")]
    index_model: Option<String>,
    /// The model that embeds /search text queries (a --model name sharing the
    /// index model's image tower, e.g. a distilled student; default: the
    /// index model).
    #[arg(long, env = "CAPIVARA_QUERY_MODEL")]
    query_model: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
    /// Most texts or images in one forward pass.
    #[arg(long, env = "CAPIVARA_MAX_BATCH_SIZE", default_value_t = 32)]
    max_batch_size: usize,
    /// Most padded tokens (texts x the longest one's tokens) in one text
    /// forward pass; a single text always fits.
    #[arg(long, env = "CAPIVARA_MAX_BATCH_TOKENS", default_value_t = 4096)]
    max_batch_tokens: usize,
    /// Longest wait, in milliseconds, for a batch to fill.
    #[arg(long, env = "CAPIVARA_MAX_BATCH_WAIT_MS", default_value_t = 5)]
    max_batch_wait_ms: u64,
    /// Requests waiting per tower before new ones get 503.
    #[arg(long, env = "CAPIVARA_QUEUE_CAPACITY", default_value_t = 256)]
    queue_capacity: usize,
    /// Largest request body, in bytes.
    #[arg(long, env = "CAPIVARA_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    max_body_bytes: usize,
    /// Largest image, in pixels (width x height), decoded.
    #[arg(long, env = "CAPIVARA_MAX_IMAGE_PIXELS", default_value_t = capivara::preprocess::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
    /// When set, POST /images and DELETE /images/{id} need `Authorization: Bearer <key>`.
    #[arg(long, env = "CAPIVARA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// With --api-key: every request needs the key, reads too (/classify,
    /// /search, /embed/*, /v1/*...); /healthz, /readyz and the page's files
    /// stay open.
    #[arg(long, env = "CAPIVARA_API_KEY_READS")]
    api_key_reads: bool,
    /// Let image fields take `http(s)://` URLs, fetched by the server (never
    /// from private, loopback, link-local or metadata addresses).
    #[arg(long, env = "CAPIVARA_ALLOW_IMAGE_URLS")]
    allow_image_urls: bool,
    /// Hosts image URLs may reach although they are not public: names,
    /// addresses or networks (`fotos.internal,10.0.0.0/8`), comma separated.
    #[arg(long, env = "CAPIVARA_IMAGE_URL_ALLOW_HOSTS", value_delimiter = ',')]
    image_url_allow_hosts: Vec<String>,
    /// Longest time, in seconds, to fetch one image URL.
    #[arg(long, env = "CAPIVARA_IMAGE_URL_TIMEOUT_SECS", default_value_t = 15.0)]
    image_url_timeout_secs: f64,
    /// Prompt templates, one per line with `{}` for the label (default: Portuguese set).
    #[arg(long, env = "CAPIVARA_TEMPLATES")]
    templates: Option<PathBuf>,
    /// Origins whose pages may call the API (CORS), comma separated, e.g.
    /// `https://fotos.example.com`; `*` for any. Default: none.
    #[arg(long, env = "CAPIVARA_CORS_ORIGINS", value_delimiter = ',')]
    cors_origins: Vec<String>,
    /// Longest time, in seconds, a request may take (its upload included); then 408.
    #[arg(long, env = "CAPIVARA_REQUEST_TIMEOUT_SECS", default_value_t = 60.0)]
    request_timeout_secs: f64,
}

#[cfg(feature = "server")]
#[derive(clap::Args)]
struct IndexArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// No progress bar (it is only drawn on a terminal anyway).
    #[arg(long)]
    no_progress: bool,
    /// Folders (searched recursively for .jpg .jpeg .png .webp .gif .bmp),
    /// image files, and webdataset shards (.tar).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

#[cfg(feature = "server")]
#[derive(clap::Args)]
struct MigrateArgs {
    /// The index to read: a data directory or a `postgres://` URL.
    #[arg(long)]
    from: String,
    /// The index to write (created if missing; it must be empty or hold
    /// the same model's embeddings): a data directory or a `postgres://` URL.
    #[arg(long)]
    to: String,
    /// Images per read and per write.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Postgres column type when the destination is a new Postgres index:
    /// `vector` or `halfvec`.
    #[arg(long, default_value = "vector")]
    index_storage: String,
    /// Postgres `maintenance_work_mem` for building the destination's HNSW
    /// index, in MiB.
    #[arg(long, default_value_t = 1024)]
    index_build_memory_mb: usize,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args)]
struct EmbedArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A text to embed (repeatable).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// An image file to embed (repeatable).
    #[arg(long = "image")]
    images: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct PullArgs {
    /// Hub repo ids (`org/name`); the text tower's config and tokenizer
    /// repos they name come along.
    #[arg(default_value = DEFAULT_MODEL)]
    models: Vec<String>,
}

#[derive(clap::Args)]
struct ModelsArgs {
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Towers to time: image, text (repeatable; default both).
    #[arg(long = "tower", value_parser = ["image", "text"])]
    towers: Vec<String>,
    /// Batch sizes (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batch: Vec<usize>,
    /// Untimed passes before timing each row.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Time each row for at least this many seconds ...
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// ... and at least this many passes.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Texts, one per line (default: the 16 Portuguese prompts of
    /// benches/prompts.txt, 8-16 tokens each).
    #[arg(long)]
    texts: Option<PathBuf>,
    /// Time the CPU kernels instead of a model: one N x N x N product with
    /// each kernel this CPU has (f32, bf16, int8), GFLOP/s (e.g. 2048).
    #[arg(long, value_name = "N")]
    ceiling: Option<usize>,
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use capivara::bench::{measure, Tower};
    if let Some(n) = args.ceiling {
        anyhow::ensure!((1..=16384).contains(&n), "--ceiling: N must be 1..=16384");
        let rows =
            capivara::bench::kernel_ceilings(n, std::time::Duration::from_secs_f64(args.seconds));
        anyhow::ensure!(
            !rows.is_empty(),
            "this CPU has no kernels of capivara's (AVX2 or AVX-512)"
        );
        return print_json(&serde_json::json!({
            "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "ceilings": rows,
        }));
    }
    let choice = args.model.parse()?;
    anyhow::ensure!(
        args.batch.iter().all(|&b| b > 0),
        "batch sizes must be positive"
    );
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds >= 0.0,
        "--seconds must be a non-negative number"
    );
    let texts = match &args.texts {
        Some(p) => {
            let t: Vec<String> = std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(String::from)
                .collect();
            anyhow::ensure!(!t.is_empty(), "{}: no texts", p.display());
            t
        }
        None => capivara::bench::default_texts(),
    };
    let towers: Vec<Tower> = if args.towers.is_empty() {
        vec![Tower::Image, Tower::Text]
    } else {
        args.towers
            .iter()
            .map(|t| {
                if t == "image" {
                    Tower::Image
                } else {
                    Tower::Text
                }
            })
            .collect()
    };
    let load = std::time::Instant::now();
    let pipeline = choice.load()?;
    let load_seconds = load.elapsed().as_secs_f64();
    let mut rows = Vec::new();
    for &tower in &towers {
        for &b in &args.batch {
            rows.push(measure(
                &pipeline,
                tower,
                b,
                &texts,
                args.warmup,
                std::time::Duration::from_secs_f64(args.seconds),
                args.iters,
            )?);
        }
    }
    let out = serde_json::json!({
        "model": choice.model,
        "device": capivara::bench::device_name(&choice.device),
        "dtype": choice.dtype.as_str(),
        "quantize": args.model.quantize,
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_seconds": load_seconds,
        "rows": rows,
    });
    print_json(&out)
}

#[derive(serde::Serialize)]
struct EmbedOutput<'a> {
    model: &'a str,
    dim: usize,
    texts: Vec<Vec<f32>>,
    images: Vec<Vec<f32>>,
}

/// Bulk indexing decodes one large photo after another: a 12 MP decode is a
/// 36 MB buffer, which glibc's malloc maps afresh and unmaps every time (its
/// mmap threshold stops at 32 MB), paying a page fault per 4 KiB page each
/// time. A batch command keeps freed memory for the next image instead.
#[cfg(feature = "server")]
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt only sets allocator parameters; called before
        // the threads that allocate start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 30);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
        }
    }
}

#[cfg(feature = "server")]
fn index(args: IndexArgs) -> anyhow::Result<()> {
    keep_freed_memory();
    let choice = args.model.parse()?;
    let (location, mut opts) = args.store.parse()?;
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    for p in &args.paths {
        anyhow::ensure!(p.exists(), "{}: no such file or folder", p.display());
    }
    let place = location.reserve()?;
    let pipeline = choice.load()?;
    let fingerprint = pipeline.fingerprint()?;
    // Writing only: no graph (the server builds it at start).
    opts.hnsw.exact_search_below = usize::MAX;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(async {
        let index = place.open(pipeline.clip.embed_dim(), opts, |_| {}).await?;
        index.claim(&fingerprint).await?;
        let r = capivara::bulk::run(
            &pipeline,
            &*index,
            &args.paths,
            args.batch_size,
            !args.no_progress,
        )
        .await?;
        index.flush().await?;
        anyhow::Ok(r)
    })?;
    print_json(&report)
}

#[cfg(feature = "server")]
fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    use capivara::store::{Location, OpenOptions};
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    let from = Location::parse(&args.from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
    let to = Location::parse(&args.to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    if let (Location::DataDir(a), Location::DataDir(b)) = (&from, &to) {
        anyhow::ensure!(
            a.canonicalize().ok() != b.canonicalize().ok() || !a.exists(),
            "--from and --to are the same data directory"
        );
    }
    let mut opts = OpenOptions::default();
    opts.hnsw.exact_search_below = usize::MAX;
    opts.pg.storage = args
        .index_storage
        .parse()
        .map_err(|e| anyhow::anyhow!("--index-storage: {e}"))?;
    opts.pg.build_memory_mb = args.index_build_memory_mb;
    let (from, to) = (from.reserve()?, to.reserve()?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(capivara::bulk::migrate(
        from,
        to,
        opts,
        args.batch_size,
        !args.no_progress,
    ))?;
    print_json(&report)
}

/// One JSON line on stdout.
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, value)?;
    writeln!(stdout)?;
    Ok(())
}

fn pull(args: PullArgs) -> anyhow::Result<()> {
    use capivara::resolve::{resolve_with, ResolveOptions};
    let hub = capivara::hub::HubConfig::from_env();
    let mut out = Vec::new();
    for model in &args.models {
        let model = model.trim();
        anyhow::ensure!(
            !std::path::Path::new(model).exists(),
            "`{model}` is a local path: `capivara pull` downloads hub repos (`org/name`); \
             a directory is used as it is with --model DIR"
        );
        let start = std::time::Instant::now();
        let opts = ResolveOptions {
            refresh: true,
            progress: None,
        };
        let (resolved, fetched) = resolve_with(model, opts)?;
        let f = &resolved.files;
        let files = [&f.config, &f.weights, &f.text_config, &f.tokenizer];
        let bytes: u64 = files
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        out.push(serde_json::json!({
            "model": model,
            "revision": fetched.revision,
            "files": {
                "config": f.config,
                "weights": f.weights,
                "text_config": f.text_config,
                "tokenizer": f.tokenizer,
            },
            "bytes": bytes,
            "downloaded_bytes": fetched.downloaded_bytes,
            "downloaded": fetched.downloaded,
            "seconds": start.elapsed().as_secs_f64(),
        }));
    }
    print_json(&serde_json::json!({
        "cache": hub.cache_dir,
        "models": out,
    }))
}

fn models(args: ModelsArgs) -> anyhow::Result<()> {
    use capivara::hub::{cached_repos, human_bytes, HubConfig};
    let hub = HubConfig::from_env();
    let repos = cached_repos(&hub)
        .map_err(|e| anyhow::anyhow!("reading the hub cache {}: {e}", hub.cache_dir.display()))?;
    if args.json {
        return print_json(&serde_json::json!({
            "cache": hub.cache_dir,
            "models": repos,
        }));
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "cache: {}", hub.cache_dir.display())?;
    if repos.is_empty() {
        writeln!(
            stdout,
            "no models cached (download one with `capivara pull {DEFAULT_MODEL}`)"
        )?;
        return Ok(());
    }
    let width = repos.iter().map(|r| r.repo.len()).max().unwrap_or(5).max(5);
    writeln!(
        stdout,
        "{:width$}  {:10}  {:>9}  {:15}  FILES",
        "MODEL", "REVISION", "SIZE", "KIND"
    )?;
    for r in &repos {
        let mut files = r.files.join(", ");
        if r.incomplete_bytes > 0 {
            files.push_str(&format!(
                " (+ {} of an unfinished download)",
                human_bytes(r.incomplete_bytes)
            ));
        }
        let rev: String = r
            .revision
            .as_deref()
            .unwrap_or("-")
            .chars()
            .take(10)
            .collect();
        writeln!(
            stdout,
            "{:width$}  {rev:10}  {:>9}  {:15}  {files}",
            r.repo,
            human_bytes(r.bytes),
            r.kind
        )?;
    }
    Ok(())
}

fn embed(args: EmbedArgs) -> anyhow::Result<()> {
    let choice = args.model.parse()?;
    // Read every image before loading the model: a bad path fails fast.
    let images = args
        .images
        .iter()
        .map(|p| std::fs::read(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pipeline = choice.load()?;
    let texts = pipeline.embed_texts(&args.texts)?.to_vec2::<f32>()?;
    let mut image_embs = Vec::with_capacity(images.len());
    for (bytes, path) in images.iter().zip(&args.images) {
        let e = pipeline
            .embed_images(std::slice::from_ref(bytes))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        image_embs.extend(e.to_vec2::<f32>()?);
    }
    let out = EmbedOutput {
        model: &choice.model,
        dim: pipeline.clip.embed_dim(),
        texts,
        images: image_embs,
    };
    print_json(&out)
}

#[cfg(feature = "server")]
fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use capivara::server::{ServeConfig, DEFAULT_TEMPLATES};
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let choice = args.model.parse()?;
    let (location, store) = args.store.parse()?;
    let mut cfg = ServeConfig::new(&choice.model, args.addr, &args.store.data_dir);
    cfg.models = choice
        .all
        .iter()
        .map(|m| capivara::server::ModelSpec::parse(m))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--model {e}"))?;
    cfg.index_model = args.index_model.clone();
    cfg.query_model = args.query_model.clone();
    cfg.api_key_reads = args.api_key_reads;
    anyhow::ensure!(
        !args.api_key_reads || args.api_key.as_deref().is_some_and(|k| !k.is_empty()),
        "--api-key-reads needs --api-key"
    );
    cfg.urls.enabled = args.allow_image_urls;
    cfg.urls.allow_hosts = args
        .image_url_allow_hosts
        .iter()
        .filter(|h| !h.trim().is_empty())
        .map(|h| h.parse())
        .collect::<Result<_, String>>()
        .map_err(|e| anyhow::anyhow!("--image-url-allow-hosts: {e}"))?;
    anyhow::ensure!(
        cfg.urls.enabled || cfg.urls.allow_hosts.is_empty(),
        "--image-url-allow-hosts only matters with --allow-image-urls"
    );
    anyhow::ensure!(
        args.image_url_timeout_secs > 0.0 && args.image_url_timeout_secs.is_finite(),
        "--image-url-timeout-secs must be a positive number of seconds"
    );
    cfg.urls.timeout = std::time::Duration::from_secs_f64(args.image_url_timeout_secs);
    cfg.urls.connect_timeout = cfg.urls.connect_timeout.min(cfg.urls.timeout);
    if let capivara::store::Location::Postgres(_) = location {
        cfg.index_url = args.store.index_url.clone();
    }
    cfg.hnsw = store.hnsw;
    cfg.pg = store.pg;
    cfg.device = choice.device;
    cfg.dtype = choice.dtype;
    cfg.quantization = choice.quantization;
    cfg.jpeg_draft = choice.jpeg_draft;
    if args.max_batch_size == 0 || args.queue_capacity == 0 || args.max_batch_tokens == 0 {
        anyhow::bail!(
            "--max-batch-size, --max-batch-tokens and --queue-capacity must be at least 1"
        );
    }
    let max_wait = std::time::Duration::from_millis(args.max_batch_wait_ms);
    cfg.engine.text = capivara::engine::BatchPolicy {
        max_items: args.max_batch_size,
        max_tokens: args.max_batch_tokens,
        max_wait,
    };
    cfg.engine.image = capivara::engine::BatchPolicy {
        max_items: args.max_batch_size,
        max_tokens: usize::MAX,
        max_wait,
    };
    cfg.engine.queue_capacity = args.queue_capacity;
    cfg.limits.max_body_bytes = args.max_body_bytes;
    cfg.limits.max_pixels = args.max_image_pixels;
    cfg.api_key = args.api_key.filter(|k| !k.is_empty());
    cfg.cors_origins = args
        .cors_origins
        .iter()
        .map(|o| o.trim().to_string())
        .filter(|o| !o.is_empty())
        .collect();
    for o in &cfg.cors_origins {
        if o != "*" && axum::http::HeaderValue::from_str(o).is_err() {
            anyhow::bail!("--cors-origins: {o:?} is not a valid origin");
        }
    }
    if !(args.request_timeout_secs > 0.0 && args.request_timeout_secs.is_finite()) {
        anyhow::bail!("--request-timeout-secs must be a positive number of seconds");
    }
    cfg.request_timeout = std::time::Duration::from_secs_f64(args.request_timeout_secs);
    cfg.templates = match &args.templates {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let t = capivara::zeroshot::parse_templates(&text);
            if t.is_empty() {
                anyhow::bail!("{}: no templates", path.display());
            }
            t
        }
        None => DEFAULT_TEMPLATES.iter().map(|s| s.to_string()).collect(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(capivara::server::run(cfg))
}

fn main() -> ExitCode {
    // candle's CPU thread pool spins 25k times waiting for work after each of
    // its ops, which takes a core from the matmul threads between candle ops:
    // a short spin measured +15% texts/s at batch 8 on 2 cores.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    let cli = Cli::parse();
    #[cfg(feature = "server")]
    let serving = matches!(cli.command, Command::Serve(_));
    #[cfg(not(feature = "server"))]
    let serving = false;
    if !serving {
        // Other commands log only what a download is doing (and warnings),
        // on stderr: stdout is their JSON.
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,capivara::hub=info,capivara::resolve=info",
                    )
                }),
            )
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let result = match cli.command {
        #[cfg(feature = "server")]
        Command::Serve(args) => serve(*args),
        Command::Embed(args) => embed(args),
        Command::Bench(args) => bench(args),
        Command::Pull(args) => pull(args),
        Command::Models(args) => models(args),
        #[cfg(feature = "server")]
        Command::Index(args) => index(args),
        #[cfg(feature = "server")]
        Command::Migrate(args) => migrate(args),
        #[cfg(feature = "server")]
        Command::Openapi => {
            print!("{}", capivara::server::openapi::document());
            Ok(())
        }
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
