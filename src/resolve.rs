//! `--model` resolution: a local directory or a Hugging Face hub repo id ->
//! the files a model is made of, with its configs parsed once.
//!
//! Files: `open_clip_config.json`; weights `open_clip_model.safetensors`, else
//! `open_clip_pytorch_model.bin`, else the first `*.ckpt`; the text tower's
//! config `text_config.json` beside them, else `config.json` of the hub repo
//! `text_cfg.hf_model_name`; the tokenizer `tokenizer.json` beside them, else
//! the one of the hub repo `text_cfg.hf_tokenizer_name`.
//!
//! A hub id is looked up in the hub's standard cache first: when every file
//! is there, nothing touches the network (a second start makes no request).
//! Otherwise the repo's listing says which files exist, and the missing ones
//! are downloaded, resumed and verified ([`crate::hub`]), with their progress
//! reported. Reading the tensors is the model's business
//! ([`crate::model::checkpoint`]); this module only finds files.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hub::{Hub, Listing, OnProgress, Progress, ProgressLog, RemoteFile};
use crate::model::{ClipConfig, XlmRobertaConfig};

/// File name of open_clip's safetensors checkpoint.
pub const SAFETENSORS_FILE: &str = "open_clip_model.safetensors";
/// File name of open_clip's PyTorch checkpoint.
pub const PYTORCH_FILE: &str = "open_clip_pytorch_model.bin";
/// open_clip's model config.
pub const CONFIG_FILE: &str = "open_clip_config.json";
/// The text tower's Hugging Face config, when a model directory carries it.
pub const TEXT_CONFIG_FILE: &str = "text_config.json";
/// The tokenizer.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The model `--model` defaults to.
pub const DEFAULT_MODEL: &str = "hiaac-nlp/CAPIVARA";

/// The files a model is made of, wherever they came from.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// `--model` as given.
    pub model: String,
    pub config: PathBuf,
    pub text_config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
}

/// A resolved model: its files and its two configs, parsed once.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub files: ModelFiles,
    pub config: ClipConfig,
    pub text_config: XlmRobertaConfig,
}

impl ResolvedModel {
    /// Parses the configs of already-located files.
    pub fn from_files(files: ModelFiles) -> Result<Self> {
        let config = ClipConfig::from_file(&files.config)?;
        let text_config = XlmRobertaConfig::from_file(&files.text_config)?;
        Ok(Self {
            files,
            config,
            text_config,
        })
    }
}

/// How to resolve.
#[derive(Default, Clone, Copy)]
pub struct ResolveOptions<'a> {
    /// Ask the hub for its newest revision even when a cached copy is
    /// complete (`capivara pull`).
    pub refresh: bool,
    /// Told as a download progresses (bytes over all the model's files).
    pub progress: Option<OnProgress<'a>>,
}

/// What resolving downloaded.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Fetched {
    /// Bytes downloaded (files already cached do not count).
    pub downloaded_bytes: u64,
    /// Files downloaded, `repo/file`.
    pub downloaded: Vec<String>,
    /// The model repo's commit, for a hub id.
    pub revision: Option<String>,
}

/// Weights in order of preference among `names` (a repo's files).
fn pick_weights<'a>(names: impl Iterator<Item = &'a str>) -> Option<String> {
    let names: Vec<&str> = names.collect();
    for f in [SAFETENSORS_FILE, PYTORCH_FILE] {
        if names.contains(&f) {
            return Some(f.to_string());
        }
    }
    let mut ckpts: Vec<&str> = names
        .into_iter()
        .filter(|n| n.ends_with(".ckpt") && !n.contains('/'))
        .collect();
    ckpts.sort();
    ckpts.first().map(|s| s.to_string())
}

fn list_ckpts_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".ckpt"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Files still to download, and the listings they belong to.
struct Plan {
    listings: Vec<Listing>,
    /// (index into `listings`, file)
    files: Vec<(usize, RemoteFile)>,
}

/// A hub session of one resolution: listings asked for once.
struct Session<'a> {
    hub: Hub,
    opts: ResolveOptions<'a>,
    listings: Vec<Listing>,
}

impl<'a> Session<'a> {
    fn new(opts: ResolveOptions<'a>) -> Self {
        Self {
            hub: Hub::from_env(),
            opts,
            listings: Vec::new(),
        }
    }

    fn listing(&mut self, repo: &str) -> std::result::Result<usize, String> {
        if let Some(i) = self.listings.iter().position(|l| l.repo == repo) {
            return Ok(i);
        }
        let l = self.hub.listing(repo).map_err(|e| e.to_string())?;
        self.listings.push(l);
        Ok(self.listings.len() - 1)
    }

    /// `file` of hub `repo`: the cached one (unless refreshing), else planned
    /// for download; `Ok(Err(...))` is its future path in `plan`.
    fn want(
        &mut self,
        repo: &str,
        file: &str,
        plan: &mut Plan,
    ) -> std::result::Result<Wanted, String> {
        if !self.opts.refresh || self.hub.config.offline {
            if let Some(p) = self.hub.config.cached_file(repo, file) {
                return Ok(Wanted::Here(p));
            }
        }
        let i = self.listing(repo)?;
        let l = &self.listings[i];
        let f = l
            .file(file)
            .cloned()
            .ok_or_else(|| format!("the repo `{repo}` has no {file} (its files: {})", l.names()))?;
        Ok(plan.add(l, f))
    }
}

enum Wanted {
    /// Already on disk.
    Here(PathBuf),
    /// Planned: the n-th file of the plan.
    Planned(usize),
}

impl Plan {
    fn add(&mut self, listing: &Listing, file: RemoteFile) -> Wanted {
        let li = match self.listings.iter().position(|l| l.repo == listing.repo) {
            Some(i) => i,
            None => {
                self.listings.push(listing.clone());
                self.listings.len() - 1
            }
        };
        if let Some(i) = self
            .files
            .iter()
            .position(|(l, f)| *l == li && f.name == file.name)
        {
            return Wanted::Planned(i);
        }
        self.files.push((li, file));
        Wanted::Planned(self.files.len() - 1)
    }

    /// Downloads every planned file; their paths in plan order.
    fn run(
        &self,
        hub: &Hub,
        label: &str,
        progress: Option<OnProgress<'_>>,
        fetched: &mut Fetched,
    ) -> std::result::Result<Vec<PathBuf>, String> {
        let missing: Vec<&(usize, RemoteFile)> = self
            .files
            .iter()
            .filter(|(l, f)| !hub.has_blob(&self.listings[*l].repo, f))
            .collect();
        let total: u64 = missing.iter().filter_map(|(_, f)| f.size).sum();
        if !missing.is_empty() {
            let names: Vec<String> = missing
                .iter()
                .map(|(l, f)| format!("{}/{}", self.listings[*l].repo, f.name))
                .collect();
            tracing::info!(
                "downloading {label} from {}: {} in {} file(s) ({}) into {}",
                hub.config.endpoint,
                crate::hub::human_bytes(total),
                missing.len(),
                names.join(", "),
                hub.config.cache_dir.display()
            );
        }
        let mut log = ProgressLog::new(label, 0);
        let mut base = 0u64;
        let mut paths = Vec::with_capacity(self.files.len());
        for (l, f) in &self.files {
            let listing = &self.listings[*l];
            let counted = !hub.has_blob(&listing.repo, f);
            let name = format!("{}/{}", listing.repo, f.name);
            let mut report = |n: u64| {
                if !counted {
                    return;
                }
                let p = Progress {
                    file: name.clone(),
                    done: base + n,
                    total: total.max(base + n),
                };
                log.tick(&p);
                if let Some(cb) = progress {
                    cb(&p);
                }
            };
            let path = hub
                .download(listing, f, &mut report)
                .map_err(|e| e.to_string())?;
            if counted {
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                base += size;
                fetched.downloaded_bytes += size;
                fetched.downloaded.push(name);
            }
            paths.push(path);
        }
        if !missing.is_empty() {
            tracing::info!(
                "downloaded {label}: {} in {:.1} s, verified",
                crate::hub::human_bytes(base),
                log.seconds()
            );
        }
        Ok(paths)
    }
}

/// Where a model's own files are.
enum Home {
    /// A directory: `--model DIR`, or the cached snapshot of a hub repo.
    Dir(PathBuf),
    /// A hub repo's listing (files being downloaded).
    Listed(Listing),
}

/// A hub model whose config and weights are both cached (unless
/// `refresh` and online): (snapshot, config, weights).
fn cached_model(
    cfg: &crate::hub::HubConfig,
    repo: &str,
    refresh: bool,
) -> Option<(PathBuf, PathBuf, PathBuf)> {
    if refresh && !cfg.offline {
        return None;
    }
    let snap = cfg.cached_snapshot(repo)?;
    if !snap.join(CONFIG_FILE).is_file() {
        return None;
    }
    let mut names: Vec<String> = [SAFETENSORS_FILE, PYTORCH_FILE]
        .into_iter()
        .filter(|f| snap.join(f).is_file())
        .map(String::from)
        .collect();
    names.extend(
        list_ckpts_in(&snap)
            .into_iter()
            .filter(|f| snap.join(f).is_file()),
    );
    let w = pick_weights(names.iter().map(String::as_str))?;
    Some((snap.clone(), snap.join(CONFIG_FILE), snap.join(w)))
}

/// Whether `model`, not an existing directory, is meant as a path rather
/// than a hub repo id (`org/name`).
fn looks_local(model: &str) -> bool {
    Path::new(model).exists()
        || model.starts_with('.')
        || model.starts_with('/')
        || model.starts_with('~')
        || model.matches('/').count() != 1
}

/// A model given as a local directory or a hub repo id, whose files are
/// fetched by name on demand (a repo id through the hub cache: a cached file
/// makes no request; another is downloaded, resumed and verified as
/// [`resolve`] does): what models other than CLIP (the trainer's captioner
/// and translator) load from.
pub struct ModelSource {
    model: String,
    home: SourceHome,
}

enum SourceHome {
    Dir(PathBuf),
    Hub {
        hub: Box<Hub>,
        listing: std::sync::Mutex<Option<Listing>>,
    },
}

impl ModelSource {
    /// `model` as given.
    pub fn name(&self) -> &str {
        &self.model
    }

    fn fetch(&self, file: &str) -> std::result::Result<PathBuf, String> {
        match &self.home {
            SourceHome::Dir(d) => {
                let p = d.join(file);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(format!("no {file} in {}", d.display()))
                }
            }
            SourceHome::Hub { hub, listing } => {
                if let Some(p) = hub.config.cached_file(&self.model, file) {
                    return Ok(p);
                }
                let mut l = listing.lock().unwrap_or_else(|e| e.into_inner());
                if l.is_none() {
                    *l = Some(hub.listing(&self.model).map_err(|e| e.to_string())?);
                }
                let l = l.as_ref().expect("listed");
                let f = l
                    .file(file)
                    .cloned()
                    .ok_or_else(|| format!("the repo has no {file} (its files: {})", l.names()))?;
                hub.download(l, &f, &mut |_| {}).map_err(|e| e.to_string())
            }
        }
    }

    /// The local path of the model's file `file`.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        self.fetch(file).map_err(|message| Error::Resolve {
            model: self.model.clone(),
            message,
        })
    }

    /// The first of `files` the model has.
    pub fn first_of(&self, files: &[&str]) -> Result<PathBuf> {
        let mut tried = Vec::new();
        for f in files {
            match self.fetch(f) {
                Ok(p) => return Ok(p),
                Err(e) => tried.push(e),
            }
        }
        Err(Error::Resolve {
            model: self.model.clone(),
            message: format!("none of {}: {}", files.join(", "), tried.join("; ")),
        })
    }
}

/// Opens `model` (a local directory, or a hub repo id) without reading
/// anything yet.
pub fn open(model: &str) -> Result<ModelSource> {
    let local = Path::new(model);
    let home = if local.is_dir() {
        SourceHome::Dir(local.to_path_buf())
    } else if looks_local(model) {
        return Err(Error::Resolve {
            model: model.to_string(),
            message: "no such directory (a hub repo id looks like `org/name`)".into(),
        });
    } else {
        SourceHome::Hub {
            hub: Box::new(Hub::from_env()),
            listing: std::sync::Mutex::new(None),
        }
    };
    Ok(ModelSource {
        model: model.to_string(),
        home,
    })
}

/// Resolves `model` (a local directory, or a hub repo id) to its files and
/// parses its configs.
pub fn resolve(model: &str) -> Result<ResolvedModel> {
    resolve_with(model, ResolveOptions::default()).map(|(m, _)| m)
}

/// [`resolve`], with options; also says what it downloaded.
pub fn resolve_with(model: &str, opts: ResolveOptions<'_>) -> Result<(ResolvedModel, Fetched)> {
    let local = Path::new(model);
    let fail = |mut message: String| {
        if message.contains("HF_HUB_OFFLINE is set") && !local.is_dir() {
            message.push_str(&format!(
                ": download the model once with network (`capivara pull {model}`), \
                 or pass --model DIR"
            ));
        }
        Error::Resolve {
            model: model.to_string(),
            message,
        }
    };
    let mut session = Session::new(opts);
    let mut plan = Plan {
        listings: Vec::new(),
        files: Vec::new(),
    };
    let mut fetched = Fetched::default();

    // open_clip_config.json and the weights: beside each other.
    let (home, config_path, weights) = if local.is_dir() {
        let config_path = local.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(fail(format!("no {CONFIG_FILE} in {}", local.display())));
        }
        let mut names: Vec<String> = [SAFETENSORS_FILE, PYTORCH_FILE]
            .into_iter()
            .filter(|f| local.join(f).is_file())
            .map(String::from)
            .collect();
        names.extend(list_ckpts_in(local));
        let weights = pick_weights(names.iter().map(String::as_str)).ok_or_else(|| {
            fail(format!(
                "no weights ({SAFETENSORS_FILE}, {PYTORCH_FILE} or *.ckpt) in {}",
                local.display()
            ))
        })?;
        let w = Wanted::Here(local.join(weights));
        (Home::Dir(local.to_path_buf()), config_path, w)
    } else if looks_local(model) {
        return Err(fail(format!(
            "no such directory (a hub repo id looks like `org/name`, e.g. `{DEFAULT_MODEL}`)"
        )));
    } else {
        match cached_model(&session.hub.config, model, opts.refresh) {
            Some((snap, c, w)) => (Home::Dir(snap), c, Wanted::Here(w)),
            None => {
                let i = session.listing(model).map_err(fail)?;
                let l = session.listings[i].clone();
                let config = l.file(CONFIG_FILE).cloned().ok_or_else(|| {
                    fail(format!(
                        "the repo has no {CONFIG_FILE}: it is not an open_clip model (its files: {})",
                        l.names()
                    ))
                })?;
                let w = pick_weights(l.files.iter().map(|f| f.name.as_str())).ok_or_else(|| {
                    fail(format!(
                        "the repo has no weights ({SAFETENSORS_FILE}, {PYTORCH_FILE} or *.ckpt; its files: {})",
                        l.names()
                    ))
                })?;
                // The config first (small): it names the text tower's repos.
                let config_path = session
                    .hub
                    .download(&l, &config, &mut |_| {})
                    .map_err(|e| fail(e.to_string()))?;
                let wf = l.file(&w).cloned().expect("picked from the listing");
                let w = plan.add(&l, wf);
                (Home::Listed(l), config_path, w)
            }
        }
    };
    let config = ClipConfig::from_file(&config_path)?;

    // The text tower's config and the tokenizer: beside the weights, else
    // from the hub repos the config names.
    let mut text_file = |file: &str, repo: &str, repo_file: &str, what: &str| -> Result<Wanted> {
        match &home {
            Home::Dir(d) if d.join(file).is_file() => return Ok(Wanted::Here(d.join(file))),
            Home::Listed(l) => {
                if let Some(f) = l.file(file) {
                    return Ok(plan.add(l, f.clone()));
                }
            }
            Home::Dir(_) => {}
        }
        session.want(repo, repo_file, &mut plan).map_err(|e| {
            fail(format!(
                "no {what} ({file} beside the weights, else {repo_file} of `{repo}`): {e}"
            ))
        })
    };
    let text_config = text_file(
        TEXT_CONFIG_FILE,
        &config.text.hf_model_name,
        "config.json",
        "text tower config",
    )?;
    let tokenizer = text_file(
        TOKENIZER_FILE,
        &config.text.hf_tokenizer_name,
        TOKENIZER_FILE,
        "tokenizer",
    )?;

    let downloaded = if plan.files.is_empty() {
        Vec::new()
    } else {
        plan.run(&session.hub, model, opts.progress, &mut fetched)
            .map_err(fail)?
    };
    let path = |w: Wanted| match w {
        Wanted::Here(p) => p,
        Wanted::Planned(i) => downloaded[i].clone(),
    };
    let (weights, text_config_path, tokenizer) =
        (path(weights), path(text_config), path(tokenizer));
    if !local.is_dir() {
        fetched.revision = session.hub.config.cached_commit(model);
    }
    let text_config = XlmRobertaConfig::from_file(&text_config_path)?;
    Ok((
        ResolvedModel {
            files: ModelFiles {
                model: model.to_string(),
                config: config_path,
                text_config: text_config_path,
                weights,
                tokenizer,
            },
            config,
            text_config,
        },
        fetched,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_flags() {
        assert!(!crate::hub::env_true("CAPIVARA_SURELY_UNSET_VARIABLE"));
    }

    #[test]
    fn a_path_that_is_not_a_directory_is_refused_without_the_hub() {
        let err = resolve("./no/such/model").unwrap_err().to_string();
        assert!(err.contains("no such directory"), "{err}");
    }
}
