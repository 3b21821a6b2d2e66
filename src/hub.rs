//! The Hugging Face hub, spoken directly: a repository's listing, downloads
//! into the hub's standard cache, and what that cache holds.
//!
//! The cache is the one `huggingface_hub` (Python) and `hf-hub` (Rust) share:
//! `<cache>/models--ORG--NAME/` with `blobs/<etag>` (the file's SHA-256 for
//! LFS files, its git blob SHA-1 for the others), `snapshots/<commit>/<file>`
//! (a relative symlink to the blob) and `refs/main` (the commit). A model
//! downloaded here is found by open_clip and the other way round.
//!
//! A download is never trusted before it is checked: it goes to
//! `blobs/<etag>.incomplete`, is resumed with a `Range` request when the
//! connection drops, and becomes `blobs/<etag>` only once its size and its
//! checksum match the hub's listing (or, where the listing has none, the
//! `X-Linked-Etag` / `ETag` and `X-Linked-Size` headers of the file).
//!
//! The environment: `HF_ENDPOINT`, `HF_TOKEN` (else the token file that
//! `huggingface-cli login` writes), `HF_HUB_CACHE` (else `HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`) and
//! `HF_HUB_OFFLINE`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The public hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision resolved (the cache's `refs/main`).
pub const REVISION: &str = "main";
/// Suffix of a download in progress (as `huggingface_hub` names it).
pub const INCOMPLETE: &str = "incomplete";

/// Failed attempts in a row (no byte gained) before a download gives up.
const MAX_FAILED_ATTEMPTS: u32 = 5;
/// How often the log says how a download is going.
const LOG_EVERY: Duration = Duration::from_secs(3);

/// Whether an environment variable is set to a true value.
pub fn env_true(name: &str) -> bool {
    std::env::var(name)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Where the hub is, who we are to it, and where its cache lives.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `https://huggingface.co` or `HF_ENDPOINT`, without a trailing slash.
    pub endpoint: String,
    pub token: Option<String>,
    /// The cache directory (holding `models--ORG--NAME` folders).
    pub cache_dir: PathBuf,
    /// `HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
}

impl HubConfig {
    pub fn from_env() -> Self {
        let hf_home = env_nonempty("HF_HOME").map(PathBuf::from).or_else(|| {
            let cache = env_nonempty("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| env_nonempty("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            Some(cache.join("huggingface"))
        });
        let hf_home = hf_home.unwrap_or_else(|| PathBuf::from(".cache/huggingface"));
        let cache_dir = env_nonempty("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = env_nonempty("HF_TOKEN").or_else(|| {
            let path = env_nonempty("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            fs::read_to_string(path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        Self {
            endpoint: env_nonempty("HF_ENDPOINT")
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache_dir,
            offline: env_true("HF_HUB_OFFLINE"),
        }
    }

    /// `<cache>/models--ORG--NAME`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache_dir
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The commit `refs/main` points at, if the repo was ever downloaded.
    pub fn cached_commit(&self, repo: &str) -> Option<String> {
        let c = fs::read_to_string(self.repo_dir(repo).join("refs").join(REVISION)).ok()?;
        let c = c.trim();
        (!c.is_empty() && !c.contains(['/', '\\', '.'])).then(|| c.to_string())
    }

    /// The cached snapshot directory of the repo's current commit.
    pub fn cached_snapshot(&self, repo: &str) -> Option<PathBuf> {
        let commit = self.cached_commit(repo)?;
        let dir = self.repo_dir(repo).join("snapshots").join(commit);
        dir.is_dir().then_some(dir)
    }

    /// A file of the cached snapshot (a dangling link does not count).
    pub fn cached_file(&self, repo: &str, file: &str) -> Option<PathBuf> {
        let p = self.cached_snapshot(repo)?.join(file);
        p.is_file().then_some(p)
    }

    /// What `HF_TOKEN` adds to an answer of 401, 403 or 404.
    fn token_hint(&self) -> &'static str {
        if self.token.is_some() {
            "a token was sent (HF_TOKEN or the saved login) and the hub did not accept it for \
             this repo: check that it is valid and, for a gated model, that its terms were \
             accepted on the model's page"
        } else {
            "no token was sent: if the repo is private or gated, set HF_TOKEN to a read token \
             (https://huggingface.co/settings/tokens)"
        }
    }
}

/// How a file is checked once downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// SHA-256 of the content (LFS files), lower-case hex.
    Sha256(String),
    /// git's blob SHA-1 (`blob <size>\0` + content), lower-case hex.
    GitSha1(String),
}

impl Checksum {
    /// Recognises a hub ETag: 64 hex digits are a SHA-256, 40 a git SHA-1.
    fn from_etag(etag: &str) -> Option<Self> {
        let e = etag
            .trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_ascii_lowercase();
        if !e.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match e.len() {
            64 => Some(Self::Sha256(e)),
            40 => Some(Self::GitSha1(e)),
            _ => None,
        }
    }

    /// The blob's name in the cache.
    pub fn etag(&self) -> &str {
        match self {
            Self::Sha256(h) | Self::GitSha1(h) => h,
        }
    }

    /// Hashes `path` (of `size` bytes) the way this checksum is computed.
    fn compute(&self, path: &Path, size: u64) -> std::io::Result<String> {
        let mut ctx = match self {
            Self::Sha256(_) => ring::digest::Context::new(&ring::digest::SHA256),
            Self::GitSha1(_) => {
                let mut c = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
                c.update(format!("blob {size}\0").as_bytes());
                c
            }
        };
        let mut f = File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        Ok(ctx
            .finish()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }
}

/// One file of a repo, as the hub lists it.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    /// Its path in the repo.
    pub name: String,
    pub size: Option<u64>,
    pub checksum: Option<Checksum>,
}

/// A repo at one commit: its files.
#[derive(Debug, Clone)]
pub struct Listing {
    pub repo: String,
    pub commit: String,
    pub files: Vec<RemoteFile>,
}

impl Listing {
    pub fn file(&self, name: &str) -> Option<&RemoteFile> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The file names, for messages.
    pub fn names(&self) -> String {
        let v: Vec<&str> = self.files.iter().map(|f| f.name.as_str()).collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }
}

#[derive(Deserialize)]
struct ApiInfo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<ApiSibling>,
}

#[derive(Deserialize)]
struct ApiSibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<ApiLfs>,
}

#[derive(Deserialize)]
struct ApiLfs {
    sha256: String,
    size: u64,
}

/// What the hub says about a file in the headers of its answer (before the
/// redirect to the storage).
#[derive(Debug, Default, Clone)]
struct FileHeaders {
    checksum: Option<Checksum>,
    size: Option<u64>,
}

/// How far a model's download has come, over all its files.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The file being downloaded (`repo/file`).
    pub file: String,
    pub done: u64,
    pub total: u64,
}

impl Progress {
    /// `12.3 MB of 1.51 GB, 1%`.
    pub fn human(&self) -> String {
        let pct = if self.total == 0 {
            100.0
        } else {
            self.done as f64 * 100.0 / self.total as f64
        };
        format!(
            "{} of {}, {pct:.0}%",
            human_bytes(self.done),
            human_bytes(self.total)
        )
    }
}

/// `1.51 GB`, `12.3 MB`, `980 B` (powers of 1000, as the hub shows sizes).
pub fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

/// A progress callback.
pub type OnProgress<'a> = &'a (dyn Fn(&Progress) + Sync);

/// The hub client.
pub struct Hub {
    pub config: HubConfig,
    agent: ureq::Agent,
}

/// Why a hub operation failed: the message says what to do.
#[derive(Debug)]
pub struct HubError {
    pub message: String,
    /// Whether trying again may help (a lost connection, a 5xx).
    retry: bool,
}

impl std::fmt::Display for HubError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl HubError {
    fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: false,
        }
    }
    fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: true,
        }
    }
}

/// `scheme://host:port` of a URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

impl Hub {
    pub fn new(config: HubConfig) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Redirects are followed by hand: the hub's own headers are on
            // the first answer, and the token must not go to the storage.
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            // A stalled transfer is a lost connection: resumed.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(format!("capivara/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self { config, agent }
    }

    pub fn from_env() -> Self {
        Self::new(HubConfig::from_env())
    }

    /// The message for a hub that cannot be reached at all.
    fn unreachable(&self, e: &ureq::Error) -> HubError {
        HubError::fatal(format!(
            "cannot reach the Hugging Face hub at {} ({e}): no network, or the hub is down. \
             To run without it, pass --model DIR with a local copy of the model (a directory \
             holding open_clip_config.json and the weights), or, on a machine that has \
             downloaded it before, set HF_HUB_OFFLINE=1 to use the cached copy \
             (`capivara models` lists the cache)",
            self.config.endpoint
        ))
    }

    /// A GET following redirects by hand (at most 5); the hub's headers
    /// about the file come back with the last answer.
    fn get(
        &self,
        url: &str,
        range: Option<&str>,
    ) -> Result<(ureq::http::Response<ureq::Body>, FileHeaders), ureq::Error> {
        let mut url = url.to_string();
        let mut first: Option<FileHeaders> = None;
        for _ in 0..6 {
            let mut req = self.agent.get(&url);
            if origin(&url) == origin(&self.config.endpoint) {
                if let Some(t) = &self.config.token {
                    req = req.header("Authorization", format!("Bearer {t}"));
                }
            }
            // Bytes as stored: a range of a compressed answer would not
            // line up with the file.
            req = req.header("Accept-Encoding", "identity");
            if let Some(r) = range {
                req = req.header("Range", r);
            }
            let resp = req.call()?;
            let h = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            // The hub's own answer (a renamed repo's redirect comes before
            // it, the storage's answer after it) carries X-Repo-Commit.
            if first.is_none() || h("x-repo-commit").is_some() {
                first = Some(FileHeaders {
                    checksum: h("x-linked-etag")
                        .or_else(|| h("etag"))
                        .and_then(|e| Checksum::from_etag(&e)),
                    size: h("x-linked-size").and_then(|s| s.trim().parse().ok()),
                });
            }
            if !resp.status().is_redirection() {
                return Ok((resp, first.unwrap_or_default()));
            }
            let Some(loc) = h("location") else {
                return Ok((resp, first.unwrap_or_default()));
            };
            url = if loc.contains("://") {
                loc
            } else if loc.starts_with('/') {
                format!("{}{loc}", origin(&url))
            } else {
                let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
                format!("{base}/{loc}")
            };
        }
        Err(ureq::Error::TooManyRedirects)
    }

    /// The message for an answer that is not a success.
    fn refusal(&self, status: u16, repo: &str, what: &str, error_code: Option<&str>) -> HubError {
        let endpoint = &self.config.endpoint;
        match status {
            401 | 403 => HubError::fatal(format!(
                "the hub ({endpoint}) refused access to the repo `{repo}` ({status}{}): either \
                 no such repo exists (check the id, `org/name`), or it is private or gated and \
                 needs a token; {}",
                error_code.map(|c| format!(", {c}")).unwrap_or_default(),
                self.config.token_hint()
            )),
            404 if error_code == Some("EntryNotFound") || what != "the repo" => {
                HubError::fatal(format!("the repo `{repo}` has no file {what} ({endpoint})"))
            }
            404 => HubError::fatal(format!(
                "no repo `{repo}` on the hub ({endpoint}, 404): check the id (`org/name`); {}",
                self.config.token_hint()
            )),
            429 | 500..=599 => HubError::retry(format!(
                "the hub ({endpoint}) answered {status} for {what} of `{repo}`"
            )),
            _ => HubError::fatal(format!(
                "the hub ({endpoint}) answered {status} for {what} of `{repo}`"
            )),
        }
    }

    /// The repo's files at the head of `main`, with sizes and checksums.
    pub fn listing(&self, repo: &str) -> Result<Listing, HubError> {
        if self.config.offline {
            return Err(HubError::fatal(format!(
                "`{repo}` is not (completely) in the hub cache ({}) and HF_HUB_OFFLINE is set",
                self.config.cache_dir.display()
            )));
        }
        let url = format!(
            "{}/api/models/{repo}/revision/{REVISION}?blobs=true",
            self.config.endpoint
        );
        let mut failures = 0;
        let mut resp = loop {
            match self.get(&url, None) {
                Ok((r, _)) if r.status().is_success() => break r,
                Ok((r, _)) => {
                    let code = r
                        .headers()
                        .get("x-error-code")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let e = self.refusal(r.status().as_u16(), repo, "the repo", code.as_deref());
                    if !e.retry || failures + 1 >= 3 {
                        return Err(e);
                    }
                    tracing::warn!("{e}; trying again");
                }
                Err(e) => {
                    let transient = matches!(e, ureq::Error::Timeout(_))
                        || matches!(&e, ureq::Error::Io(io)
                            if io.kind() != std::io::ErrorKind::ConnectionRefused);
                    if !transient || failures + 1 >= 3 {
                        return Err(self.unreachable(&e));
                    }
                    tracing::warn!("the hub at {}: {e}; trying again", self.config.endpoint);
                }
            }
            failures += 1;
            std::thread::sleep(Duration::from_millis(500 << failures));
        };
        let info: ApiInfo = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_json()
            .map_err(|e| {
                HubError::fatal(format!(
                    "the hub's listing of `{repo}` ({url}) is not what a hub answers: {e}"
                ))
            })?;
        let commit = info
            .sha
            .filter(|s| !s.is_empty() && !s.contains(['/', '\\', '.']))
            .ok_or_else(|| {
                HubError::fatal(format!("the hub's listing of `{repo}` names no commit"))
            })?;
        let files = info
            .siblings
            .into_iter()
            .filter(|s| {
                // Never a path that leaves the snapshot.
                !s.rfilename.is_empty()
                    && !s.rfilename.starts_with('/')
                    && !s.rfilename.split(['/', '\\']).any(|c| c == "..")
            })
            .map(|s| match s.lfs {
                Some(lfs) => RemoteFile {
                    name: s.rfilename,
                    size: Some(lfs.size),
                    checksum: Checksum::from_etag(&lfs.sha256),
                },
                None => RemoteFile {
                    name: s.rfilename,
                    size: s.size,
                    checksum: s.blob_id.as_deref().and_then(Checksum::from_etag),
                },
            })
            .collect();
        Ok(Listing {
            repo: repo.to_string(),
            commit,
            files,
        })
    }

    fn file_url(&self, repo: &str, commit: &str, file: &str) -> String {
        format!("{}/{repo}/resolve/{commit}/{file}", self.config.endpoint)
    }

    /// The blob a listed file will be stored as, if the listing says (else
    /// it is known only from the download's headers).
    pub fn blob_path(&self, repo: &str, file: &RemoteFile) -> Option<PathBuf> {
        let c = file.checksum.as_ref()?;
        Some(self.config.repo_dir(repo).join("blobs").join(c.etag()))
    }

    /// Whether the file's verified blob is already in the cache.
    pub fn has_blob(&self, repo: &str, file: &RemoteFile) -> bool {
        match (self.blob_path(repo, file), file.size) {
            (Some(p), Some(size)) => fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == size),
            _ => false,
        }
    }

    /// Downloads `file` of `listing` into the cache (unless its blob is
    /// there), checked, and links it into the snapshot; `on_bytes` is told
    /// how many bytes of it are on disk as they arrive.
    pub fn download(
        &self,
        listing: &Listing,
        file: &RemoteFile,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<PathBuf, HubError> {
        let repo = &listing.repo;
        let url = self.file_url(repo, &listing.commit, &file.name);
        let io = |what: &str, p: &Path, e: std::io::Error| {
            HubError::fatal(format!("{what} {}: {e}", p.display()))
        };
        // Size and checksum: the listing's, else the file's headers.
        let (size, checksum) = match (file.size, file.checksum.clone()) {
            (Some(s), Some(c)) => (s, c),
            (size, checksum) => {
                let (resp, h) = self
                    .get(&url, Some("bytes=0-0"))
                    .map_err(|e| self.unreachable(&e))?;
                let status = resp.status().as_u16();
                if !resp.status().is_success() {
                    return Err(self.refusal(status, repo, &file.name, None));
                }
                let total = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.rsplit('/').next()?.trim().parse().ok())
                    .or_else(|| {
                        resp.headers()
                            .get("content-length")
                            .and_then(|v| v.to_str().ok()?.trim().parse().ok())
                    });
                let size = size.or(h.size).or(total).ok_or_else(|| {
                    HubError::fatal(format!("the hub gives no size for {repo}/{}", file.name))
                })?;
                let checksum = checksum.or(h.checksum).ok_or_else(|| {
                    HubError::fatal(format!(
                        "the hub gives no checksum (listing, X-Linked-Etag or ETag) for {repo}/{}: \
                         it cannot be verified",
                        file.name
                    ))
                })?;
                (size, checksum)
            }
        };
        let repo_dir = self.config.repo_dir(repo);
        let blobs = repo_dir.join("blobs");
        fs::create_dir_all(&blobs).map_err(|e| io("cannot create", &blobs, e))?;
        let blob = blobs.join(checksum.etag());
        let part = blobs.join(format!("{}.{INCOMPLETE}", checksum.etag()));
        // One download of a blob at a time, across processes: a lock file
        // where huggingface_hub keeps its own (`<cache>/.locks/<repo>/`).
        let locks = self
            .config
            .cache_dir
            .join(".locks")
            .join(repo_dir.file_name().expect("a repo folder has a name"));
        fs::create_dir_all(&locks).map_err(|e| io("cannot create", &locks, e))?;
        let lock_path = locks.join(format!("{}.lock", checksum.etag()));
        let lock = File::create(&lock_path).map_err(|e| io("cannot create", &lock_path, e))?;
        if lock.try_lock().is_err() {
            tracing::info!(
                "{repo}/{}: another process is downloading it; waiting",
                file.name
            );
            lock.lock().map_err(|e| io("cannot lock", &lock_path, e))?;
        }
        let have = |p: &Path| fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == size);
        if !have(&blob) {
            self.fetch_blob(repo, &file.name, &url, size, &checksum, &part, on_bytes)?;
            fs::rename(&part, &blob).map_err(|e| io("cannot rename", &part, e))?;
        }
        on_bytes(size);
        drop(lock);
        let pointer = repo_dir
            .join("snapshots")
            .join(&listing.commit)
            .join(&file.name);
        link(&blob, &pointer).map_err(|e| io("cannot link", &pointer, e))?;
        let refs = repo_dir.join("refs");
        fs::create_dir_all(&refs).map_err(|e| io("cannot create", &refs, e))?;
        fs::write(refs.join(REVISION), &listing.commit)
            .map_err(|e| io("cannot write", &refs.join(REVISION), e))?;
        Ok(pointer)
    }

    /// Brings `part` to `size` bytes matching `checksum`: resumed after a
    /// lost connection, started over after a mismatch.
    #[allow(clippy::too_many_arguments)]
    fn fetch_blob(
        &self,
        repo: &str,
        name: &str,
        url: &str,
        size: u64,
        checksum: &Checksum,
        part: &Path,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<(), HubError> {
        let io = |what: &str, e: std::io::Error| {
            HubError::fatal(format!("{what} {}: {e}", part.display()))
        };
        let mut failures = 0u32;
        loop {
            let start = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
            let result = if start > size {
                Err(HubError::retry(format!(
                    "a partial download longer than the file ({start} > {size} bytes)"
                )))
            } else if start == size {
                Ok(())
            } else {
                self.fetch_range(repo, name, url, start, size, part, on_bytes)
            };
            let result = result.and_then(|()| {
                let got = checksum
                    .compute(part, size)
                    .map_err(|e| io("cannot read", e))?;
                if got == checksum.etag() {
                    Ok(())
                } else {
                    Err(HubError::retry(format!(
                        "the bytes received do not match the hub's checksum ({} {}, got {got})",
                        match checksum {
                            Checksum::Sha256(_) => "SHA-256",
                            Checksum::GitSha1(_) => "git SHA-1",
                        },
                        checksum.etag()
                    )))
                }
            });
            let e = match result {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let now = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
            // A full-length file that does not check out is started over.
            if now >= size {
                let _ = fs::remove_file(part);
            }
            if !e.retry {
                return Err(e);
            }
            if now > start && now < size {
                failures = 0;
            } else {
                failures += 1;
            }
            if failures >= MAX_FAILED_ATTEMPTS {
                // Bytes received whole are kept for the next run to resume
                // from (they are checked with the rest at the end).
                let kept = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
                let cached = if kept > 0 {
                    format!(
                        "the {kept} bytes received are kept in {} and the next run resumes from there",
                        part.display()
                    )
                } else {
                    "nothing was cached".to_string()
                };
                return Err(HubError::fatal(format!(
                    "downloading {repo}/{name} failed {failures} times in a row: {e}; \
                     {cached}. Run again to retry"
                )));
            }
            let wait = Duration::from_millis((250u64 << failures.min(6)).min(10_000));
            tracing::warn!(
                "{repo}/{name}: {e}; resuming at byte {} in {:.1} s",
                fs::metadata(part).map(|m| m.len()).unwrap_or(0),
                wait.as_secs_f64()
            );
            std::thread::sleep(wait);
        }
    }

    /// One request for bytes `start..` of the file, appended to `part`.
    #[allow(clippy::too_many_arguments)]
    fn fetch_range(
        &self,
        repo: &str,
        name: &str,
        url: &str,
        start: u64,
        size: u64,
        part: &Path,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<(), HubError> {
        let io = |what: &str, e: std::io::Error| {
            HubError::fatal(format!("{what} {}: {e}", part.display()))
        };
        let range = format!("bytes={start}-");
        let (mut resp, _) = self
            .get(url, (start > 0).then_some(range.as_str()))
            .map_err(|e| HubError::retry(format!("{e}")))?;
        let status = resp.status().as_u16();
        let mut offset = match status {
            200 => 0,
            206 => {
                let from = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| {
                        v.trim()
                            .strip_prefix("bytes ")?
                            .split('-')
                            .next()?
                            .parse::<u64>()
                            .ok()
                    });
                from.unwrap_or(u64::MAX)
            }
            416 => {
                // The range is past the end: what we have is suspect.
                let _ = fs::remove_file(part);
                return Err(HubError::retry("the hub refused the resumed range (416)"));
            }
            _ => {
                let code = resp
                    .headers()
                    .get("x-error-code")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                return Err(self.refusal(status, repo, name, code.as_deref()));
            }
        };
        if offset != 0 && offset != start {
            return Err(HubError::retry(format!(
                "asked for bytes from {start}, the hub sent another range"
            )));
        }
        let mut out = if offset == 0 {
            File::create(part).map_err(|e| io("cannot create", e))?
        } else {
            OpenOptions::new()
                .append(true)
                .open(part)
                .map_err(|e| io("cannot open", e))?
        };
        on_bytes(offset);
        let mut body = resp.body_mut().with_config().limit(u64::MAX).reader();
        let mut buf = vec![0u8; 256 << 10];
        while offset < size {
            let want = buf.len().min((size - offset) as usize);
            let n = match body.read(&mut buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    out.flush().map_err(|e| io("cannot write", e))?;
                    return Err(HubError::retry(format!(
                        "the connection broke after {offset} of {size} bytes ({e})"
                    )));
                }
            };
            out.write_all(&buf[..n])
                .map_err(|e| io("cannot write", e))?;
            offset += n as u64;
            on_bytes(offset);
        }
        out.sync_all().map_err(|e| io("cannot write", e))?;
        if offset < size {
            return Err(HubError::retry(format!(
                "the connection closed after {offset} of {size} bytes"
            )));
        }
        Ok(())
    }
}

/// `pointer` -> `blob` as a relative symlink (a copy where links fail).
fn link(blob: &Path, pointer: &Path) -> std::io::Result<()> {
    let parent = pointer.parent().expect("a snapshot path has a parent");
    fs::create_dir_all(parent)?;
    if fs::symlink_metadata(pointer).is_ok() {
        fs::remove_file(pointer)?;
    }
    // snapshots/<commit>/<file> -> ../../blobs/<etag>, one more `..` per
    // folder of the file's path.
    let depth = pointer
        .strip_prefix(blob.parent().and_then(Path::parent).unwrap_or(parent))
        .map(|p| p.components().count().saturating_sub(1))
        .unwrap_or(0);
    let mut rel = PathBuf::new();
    for _ in 0..depth {
        rel.push("..");
    }
    rel.push("blobs");
    rel.push(blob.file_name().expect("a blob has a name"));
    #[cfg(unix)]
    if std::os::unix::fs::symlink(&rel, pointer).is_ok() {
        return Ok(());
    }
    fs::copy(blob, pointer).map(|_| ())
}

/// Says every few seconds how a download is going.
pub struct ProgressLog {
    label: String,
    started: Instant,
    last: Instant,
    first: u64,
}

impl ProgressLog {
    pub fn new(label: impl Into<String>, already: u64) -> Self {
        let now = Instant::now();
        Self {
            label: label.into(),
            started: now,
            last: now,
            first: already,
        }
    }

    pub fn tick(&mut self, p: &Progress) {
        if self.last.elapsed() >= LOG_EVERY {
            self.last = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(1e-3);
            let rate = p.done.saturating_sub(self.first) as f64 / secs;
            tracing::info!(
                "downloading {}: {}, {}/s, {}",
                self.label,
                p.human(),
                human_bytes(rate as u64),
                p.file
            );
        }
    }

    pub fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// One repo of the cache, for `capivara models`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedRepo {
    pub repo: String,
    /// The commit `refs/main` names.
    pub revision: Option<String>,
    /// Files of that snapshot.
    pub files: Vec<String>,
    /// Bytes of that snapshot's files.
    pub bytes: u64,
    /// Bytes of downloads not finished (resumed on the next run).
    pub incomplete_bytes: u64,
    /// `open_clip model` (an `open_clip_config.json`), `text tower` (a
    /// `config.json` or `tokenizer.json`: a `hf_model_name` repo) or `other`.
    pub kind: &'static str,
}

/// The model repos of the cache, sorted by id.
pub fn cached_repos(config: &HubConfig) -> std::io::Result<Vec<CachedRepo>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(&config.cache_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_prefix("models--") else {
            continue;
        };
        let repo = id.replace("--", "/");
        let revision = config.cached_commit(&repo);
        let mut files = Vec::new();
        let mut bytes = 0;
        if let Some(snap) = config.cached_snapshot(&repo) {
            walk(&snap, &snap, &mut files, &mut bytes);
        }
        files.sort();
        let has = |f: &str| files.iter().any(|x| x == f);
        let kind = if has("open_clip_config.json") {
            "open_clip model"
        } else if has("config.json") || has("tokenizer.json") {
            "text tower"
        } else {
            "other"
        };
        let incomplete_bytes = fs::read_dir(e.path().join("blobs"))
            .map(|rd| {
                rd.flatten()
                    .filter(|b| b.file_name().to_string_lossy().ends_with(INCOMPLETE))
                    .filter_map(|b| b.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        out.push(CachedRepo {
            repo,
            revision,
            files,
            bytes,
            incomplete_bytes,
            kind,
        });
    }
    out.sort_by(|a, b| a.repo.cmp(&b.repo));
    Ok(out)
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<String>, bytes: &mut u64) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        // Follows the links to the blobs; a dangling one is skipped.
        match fs::metadata(&p) {
            Ok(m) if m.is_dir() => walk(root, &p, files, bytes),
            Ok(m) => {
                *bytes += m.len();
                if let Ok(rel) = p.strip_prefix(root) {
                    files.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_recognised_by_length() {
        let sha = "a".repeat(64);
        assert_eq!(
            Checksum::from_etag(&format!("\"{sha}\"")),
            Some(Checksum::Sha256(sha))
        );
        let git = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            Checksum::from_etag(&format!("W/\"{git}\"")),
            Some(Checksum::GitSha1(git.into()))
        );
        assert_eq!(Checksum::from_etag("\"not-a-hash\""), None);
    }

    #[test]
    fn checksums_match_known_values() {
        let dir = std::env::temp_dir().join(format!("capivara-hub-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        fs::write(&p, b"hello\n").unwrap();
        // `sha256sum` and `git hash-object` of "hello\n".
        let sha = Checksum::Sha256(
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03".into(),
        );
        assert_eq!(sha.compute(&p, 6).unwrap(), sha.etag());
        let git = Checksum::GitSha1("ce013625030ba8dba906f756967f9e9ca394464a".into());
        assert_eq!(git.compute(&p, 6).unwrap(), git.etag());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn origins_and_sizes() {
        assert_eq!(
            origin("http://127.0.0.1:9/api/models/a/b"),
            "http://127.0.0.1:9"
        );
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
        assert_eq!(human_bytes(1_510_000_000), "1.51 GB");
        assert_eq!(human_bytes(999), "999 B");
    }
}
