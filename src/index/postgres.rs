//! The index in Postgres with pgvector: any number of stateless capivara
//! processes on one database (`--index-url postgres://...`).
//!
//! Schema (created and migrated at start, under an advisory lock so that
//! replicas starting together do it once):
//! - `capivara_meta(key text primary key, value jsonb)`: `schema_version`,
//!   `dim`, `storage` (`vector` or `halfvec`) and the model `fingerprint`;
//! - `capivara_images(id text collate "C" primary key, embedding vector(D) or
//!   halfvec(D), metadata jsonb, thumbnail bytea, created_at, updated_at)`;
//! - an HNSW index on `embedding` (`vector_ip_ops` / `halfvec_ip_ops`: the
//!   vectors are normalised, so the inner product is the cosine), with
//!   `m` and `ef_construction` from the options.
//!
//! Writes are `INSERT ... ON CONFLICT (id) DO UPDATE` in one transaction
//! (last writer wins; an insert is all or none, acknowledged after COMMIT);
//! batches of [`COPY_ABOVE`] rows or more go through `COPY ... (FORMAT binary)`
//! into a temporary table first. Searches read `ef_search` candidates
//! (at least `k`) from the HNSW index, or scan exactly while the table holds
//! at most `exact_search_below` rows, as the embedded index does.
//!
//! Errors that mean "the database cannot be reached now" (refused or lost
//! connections, a server shutting down or starting, pool timeouts) become
//! [`IndexError::Unavailable`]; every operation is bounded by
//! `operation_timeout`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use pgvector::Vector;
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use super::backend::{Backend, Fingerprint, NewImage, StoredImage, Thumbnail};
use super::{normalized, validate_id, Hit, IndexError};

/// Batches of at least this many rows are written with binary COPY.
pub const COPY_ABOVE: usize = 64;
/// The schema this build writes and reads.
pub const SCHEMA_VERSION: i64 = 1;
/// `pg_advisory_xact_lock` key of schema changes and fingerprint claims
/// (the bytes of "capivara" as an integer).
const LOCK_KEY: i64 = 0x6361_7069_7661_7261;

/// How vectors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// 4 bytes a dimension: scores exact to f32.
    Vector,
    /// 2 bytes a dimension (half the size, scores rounded to f16 inputs).
    Halfvec,
}

impl Storage {
    fn sql_type(self) -> &'static str {
        match self {
            Storage::Vector => "vector",
            Storage::Halfvec => "halfvec",
        }
    }

    fn ops(self) -> &'static str {
        match self {
            Storage::Vector => "vector_ip_ops",
            Storage::Halfvec => "halfvec_ip_ops",
        }
    }
}

impl std::str::FromStr for Storage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vector" | "f32" => Ok(Storage::Vector),
            "halfvec" | "f16" => Ok(Storage::Halfvec),
            _ => Err(format!("unknown vector storage `{s}` (vector, halfvec)")),
        }
    }
}

/// Tuning of the Postgres backend.
#[derive(Debug, Clone, PartialEq)]
pub struct PgOptions {
    /// HNSW links per node (pgvector's `m`), used when the index is created.
    pub m: usize,
    /// HNSW candidate list while building (`ef_construction`), at creation.
    pub ef_construction: usize,
    /// HNSW candidate list while searching (`hnsw.ef_search`); at least `k`
    /// is used.
    pub ef_search: usize,
    /// Column type of new tables.
    pub storage: Storage,
    /// With at most this many rows, searches are exact scans.
    pub exact_search_below: usize,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Longest wait for a connection (new or from the pool).
    pub connect_timeout: Duration,
    /// Longest time one operation may take; then `Unavailable`.
    pub operation_timeout: Duration,
    /// `maintenance_work_mem` of an HNSW build, in MiB (the graph of 1M
    /// 512-d vectors needs about 2.5 GiB to be built in memory).
    pub build_memory_mb: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 64,
            ef_search: 200,
            storage: Storage::Vector,
            exact_search_below: 10_000,
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            build_memory_mb: 1024,
        }
    }
}

/// A parsed `--index-url`: the client config and the TLS it asks for.
pub struct PgUrl {
    config: tokio_postgres::Config,
    tls: tls::Mode,
    shown: String,
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl PgUrl {
    /// Parses a libpq-style URL (`postgres://user:pass@host:port/db?...`):
    /// `sslmode` = `disable`, `prefer`, `require` (encrypted; the certificate
    /// checked only when `sslrootcert` is given), `verify-ca` (the chain
    /// against `sslrootcert`, else the Mozilla roots) or `verify-full` (and
    /// the host name); `connect_timeout`, `application_name`, `options`...
    /// as tokio-postgres reads them.
    pub fn parse(url: &str) -> Result<Self, String> {
        let (rest, tls) = tls::Mode::from_url(url)?;
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| format!("not a Postgres URL ({e})"))?;
        if config.get_hosts().is_empty() {
            config.host("localhost");
        }
        if config.get_user().is_none() {
            config.user("postgres");
        }
        if config.get_application_name().is_none() {
            config.application_name("capivara");
        }
        let shown = describe(&config);
        Ok(Self { config, tls, shown })
    }
}

/// `host:port/db as user`, never the password.
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres {host}:{port}/{} as {}",
        config.get_dbname().unwrap_or("postgres"),
        config.get_user().unwrap_or("postgres")
    )
}

/// The Postgres backend.
pub struct PgBackend {
    pool: Pool,
    dim: usize,
    storage: Storage,
    opts: PgOptions,
    shown: String,
    /// Rows, as last counted (exact vs HNSW search); -1: not yet.
    rows: AtomicI64,
    counted: std::sync::Mutex<Instant>,
    /// A bulk load dropped the HNSW index, to build it once at the end.
    deferred: std::sync::atomic::AtomicBool,
}

/// Whether a database error means "not reachable now".
fn unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") // connection exceptions
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || *code == SqlState::QUERY_CANCELED
        }
        // No SQLSTATE: an I/O error, a refused or lost connection.
        None => true,
    }
}

/// The error with its causes ("error connecting to server: Connection
/// refused (os error 111)").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !s.contains(&c_text) {
            s = format!("{s}: {c_text}");
        }
        cause = c.source();
    }
    s
}

fn db_error(e: tokio_postgres::Error) -> IndexError {
    if unavailable(&e) {
        IndexError::Unavailable(chain(&e))
    } else {
        let msg = match e.as_db_error() {
            Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
            None => format!("postgres: {}", chain(&e)),
        };
        IndexError::Storage(std::io::Error::other(msg))
    }
}

fn pool_error(e: deadpool_postgres::PoolError) -> IndexError {
    use deadpool_postgres::PoolError as P;
    match e {
        P::Backend(e) => db_error(e),
        P::Timeout(_) => IndexError::Unavailable("no database connection in time".into()),
        P::Closed => IndexError::Unavailable("the connection pool is closed".into()),
        other => IndexError::Unavailable(other.to_string()),
    }
}

impl PgBackend {
    /// Connects, creates or migrates the schema for `dim`-dimensional
    /// vectors, and checks that an existing table matches.
    pub async fn connect(url: &PgUrl, dim: usize, opts: PgOptions) -> Result<Self, IndexError> {
        let mut config = url.config.clone();
        config.connect_timeout(opts.connect_timeout);
        // Every connection searches with this candidate list unless a query
        // asks for more (pgvector reads it when it loads).
        let options = format!(
            "{} -c hnsw.ef_search={}",
            config.get_options().unwrap_or(""),
            opts.ef_search.clamp(1, 1000)
        );
        config.options(options.trim());
        let manager = Manager::from_config(
            config,
            url.tls.connector(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(opts.pool_size.max(1))
            .wait_timeout(Some(opts.connect_timeout))
            .create_timeout(Some(opts.connect_timeout))
            .recycle_timeout(Some(opts.connect_timeout))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| IndexError::Unavailable(e.to_string()))?;
        let me = Self {
            pool,
            dim,
            storage: opts.storage,
            opts,
            shown: url.shown.clone(),
            rows: AtomicI64::new(-1),
            counted: std::sync::Mutex::new(Instant::now()),
            deferred: Default::default(),
        };
        let storage = me.timed(me.migrate()).await?;
        let me = Self { storage, ..me };
        // A bulk load that did not finish left the table without its index.
        if !me.timed(me.has_hnsw()).await? {
            tracing::warn!(
                "{}: the HNSW index is missing (an interrupted bulk load?): building it",
                me.shown
            );
            me.build_hnsw().await?;
        }
        Ok(me)
    }

    async fn has_hnsw(&self) -> Result<bool, IndexError> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT to_regclass('capivara_images_embedding') IS NOT NULL",
                &[],
            )
            .await
            .map_err(db_error)?;
        Ok(row.get(0))
    }

    /// Builds the HNSW index if it is missing (`CREATE INDEX`, with
    /// `build_memory_mb` of `maintenance_work_mem`, parallel workers as the
    /// server allows); one builder at a time (an advisory lock). No
    /// operation timeout: at a million rows it takes minutes.
    pub async fn build_hnsw(&self) -> Result<Duration, IndexError> {
        let started = Instant::now();
        let c = self.client().await?;
        c.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(db_error)?;
        let sql = format!(
            "SET maintenance_work_mem = '{mem}MB';
             CREATE INDEX IF NOT EXISTS capivara_images_embedding ON capivara_images
                USING hnsw (embedding {ops}) WITH (m = {m}, ef_construction = {ef});
             RESET maintenance_work_mem;",
            mem = self.opts.build_memory_mb.max(64),
            ops = self.storage.ops(),
            m = self.opts.m.clamp(2, 100),
            ef = self.opts.ef_construction.max(4),
        );
        let built = c.batch_execute(&sql).await.map_err(db_error);
        let unlocked = c
            .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
            .await
            .map_err(db_error);
        built?;
        unlocked?;
        tracing::info!(
            "{}: HNSW index ready in {:.1?}",
            self.shown,
            started.elapsed()
        );
        Ok(started.elapsed())
    }

    /// Connects once and says whether the connection is encrypted (for
    /// checking a URL's TLS settings; creates nothing).
    pub async fn probe(url: &PgUrl) -> Result<bool, IndexError> {
        let (client, conn) = url
            .config
            .connect(url.tls.connector())
            .await
            .map_err(db_error)?;
        let task = tokio::spawn(conn);
        let row = client
            .query_one(
                "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
                &[],
            )
            .await
            .map_err(db_error)?;
        drop(client);
        let _ = task.await;
        Ok(row.get(0))
    }

    /// The fingerprint an existing database records, if any (without
    /// creating anything).
    pub async fn recorded(url: &PgUrl) -> Result<Option<Fingerprint>, IndexError> {
        let (client, conn) = url
            .config
            .connect(url.tls.connector())
            .await
            .map_err(db_error)?;
        let task = tokio::spawn(conn);
        let row = client
            .query_opt(
                "SELECT value FROM capivara_meta WHERE key = 'fingerprint'
                 AND to_regclass('capivara_meta') IS NOT NULL",
                &[],
            )
            .await;
        drop(client);
        let _ = task.await;
        let row = match row {
            Ok(r) => r,
            Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => return Ok(None),
            Err(e) => return Err(db_error(e)),
        };
        row.map(|r| serde_json::from_value(r.get::<_, Value>(0)))
            .transpose()
            .map_err(|e| IndexError::Corrupt(format!("the stored fingerprint: {e}")))
    }

    /// Bounds `fut` by the operation timeout.
    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, IndexError>>,
    ) -> Result<T, IndexError> {
        match tokio::time::timeout(self.opts.operation_timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(IndexError::Unavailable(format!(
                "the database did not answer within {:?}",
                self.opts.operation_timeout
            ))),
        }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, IndexError> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Creates what is missing, under the advisory lock; returns the
    /// storage of the table (an existing table keeps its own).
    async fn migrate(&self) -> Result<Storage, IndexError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(db_error)?;
        tx.batch_execute(
            "CREATE EXTENSION IF NOT EXISTS vector;
             CREATE TABLE IF NOT EXISTS capivara_meta (key text PRIMARY KEY, value jsonb NOT NULL);",
        )
        .await
        .map_err(|e| match e.as_db_error() {
            Some(db) if db.code() == &SqlState::UNDEFINED_FILE || db.message().contains("vector") => {
                IndexError::Storage(std::io::Error::other(format!(
                    "postgres: the pgvector extension is not available on this server ({})",
                    db.message()
                )))
            }
            _ => db_error(e),
        })?;
        let meta = |key: &'static str| {
            let tx = &tx;
            async move {
                tx.query_opt("SELECT value FROM capivara_meta WHERE key = $1", &[&key])
                    .await
                    .map(|r| r.map(|r| r.get::<_, Value>(0)))
                    .map_err(db_error)
            }
        };
        let version = meta("schema_version")
            .await?
            .and_then(|v| v.as_i64())
            .unwrap_or(0);
        if version > SCHEMA_VERSION {
            return Err(IndexError::Corrupt(format!(
                "the database's capivara schema is version {version}, newer than this build's \
                 {SCHEMA_VERSION}: upgrade capivara"
            )));
        }
        let storage = match meta("storage").await? {
            Some(v) => v
                .as_str()
                .unwrap_or("")
                .parse::<Storage>()
                .map_err(IndexError::Corrupt)?,
            None => self.opts.storage,
        };
        if let Some(d) = meta("dim").await?.and_then(|v| v.as_u64()) {
            if d as usize != self.dim {
                return Err(IndexError::ModelMismatch(format!(
                    "the index in {} holds {d}-d vectors; this model embeds in {} dimensions",
                    self.shown, self.dim
                )));
            }
        }
        if version < 1 {
            let ty = storage.sql_type();
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS capivara_images (
                    id text COLLATE \"C\" PRIMARY KEY,
                    embedding {ty}({dim}) NOT NULL,
                    metadata jsonb NOT NULL DEFAULT '{{}}',
                    thumbnail bytea,
                    created_at timestamptz NOT NULL DEFAULT now(),
                    updated_at timestamptz NOT NULL DEFAULT now());
                 -- In the row, not TOAST: a 512-d f32 vector is just over
                 -- TOAST's 2 kB threshold, and moving it out of line costs
                 -- every write and every fetch.
                 ALTER TABLE capivara_images ALTER COLUMN embedding SET STORAGE PLAIN;
                 CREATE INDEX IF NOT EXISTS capivara_images_embedding ON capivara_images
                    USING hnsw (embedding {ops}) WITH (m = {m}, ef_construction = {ef});",
                dim = self.dim,
                ops = storage.ops(),
                m = self.opts.m.clamp(2, 100),
                ef = self.opts.ef_construction.max(4),
            );
            tx.batch_execute(&sql).await.map_err(db_error)?;
            for (key, value) in [
                ("dim", serde_json::json!(self.dim)),
                ("storage", serde_json::json!(storage.sql_type())),
                ("schema_version", serde_json::json!(SCHEMA_VERSION)),
            ] {
                tx.execute(
                    "INSERT INTO capivara_meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&key, &value],
                )
                .await
                .map_err(db_error)?;
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(storage)
    }

    /// The table's row count, recounted at most every few seconds.
    async fn rows(&self, c: &deadpool_postgres::Object) -> Result<i64, IndexError> {
        let stale = {
            let last = self.counted.lock().unwrap_or_else(|e| e.into_inner());
            self.rows.load(Ordering::Relaxed) < 0 || last.elapsed() > Duration::from_secs(5)
        };
        if stale {
            // Exact near the threshold; the planner's estimate (no scan)
            // once the table is well past it.
            let n: i64 = c
                .query_one(
                    "SELECT CASE WHEN c.reltuples > $1 THEN c.reltuples::int8
                            ELSE (SELECT count(*) FROM capivara_images) END
                     FROM pg_class c WHERE c.oid = 'capivara_images'::regclass",
                    &[&(4.0 * self.opts.exact_search_below as f32)],
                )
                .await
                .map_err(db_error)?
                .get(0);
            self.rows.store(n, Ordering::Relaxed);
            *self.counted.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
        Ok(self.rows.load(Ordering::Relaxed))
    }

    /// The query vector as the column's type expects it, in SQL.
    fn cast(&self) -> &'static str {
        match self.storage {
            Storage::Vector => "$1::vector",
            Storage::Halfvec => "$1::vector::halfvec",
        }
    }

    /// Checks and normalises the rows of an insert.
    fn prepare(&self, images: Vec<NewImage>) -> Result<Vec<NewImage>, IndexError> {
        images
            .into_iter()
            .map(|mut im| {
                validate_id(&im.id)?;
                im.vector = normalized(&im.vector, self.dim)?;
                Ok(im)
            })
            .collect()
    }

    /// The oid-bearing type of `sql_type` (`vector`, `halfvec`), asked
    /// before a COPY starts (the connection takes no other statement during
    /// one).
    async fn pg_type(
        tx: &deadpool_postgres::Transaction<'_>,
        sql_type: &str,
    ) -> Result<Type, IndexError> {
        Ok(tx
            .prepare(&format!("SELECT NULL::{sql_type}"))
            .await
            .map_err(db_error)?
            .columns()[0]
            .type_()
            .clone())
    }

    /// Binary COPY of `images` into `target` (`table (columns)`): `ord`
    /// first when `with_ord`, the embedding as `vector` or as the table's
    /// storage type.
    async fn copy_rows(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        target: &str,
        images: &[NewImage],
        with_ord: bool,
        storage: Storage,
    ) -> Result<(), IndexError> {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        let embedding = Self::pg_type(tx, storage.sql_type()).await?;
        let mut types = vec![Type::TEXT, embedding, Type::JSONB, Type::BYTEA];
        if with_ord {
            types.insert(0, Type::INT4);
        }
        let sink = tx
            .copy_in(&format!("COPY {target} FROM STDIN (FORMAT binary)"))
            .await
            .map_err(db_error)?;
        let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
        for (ord, im) in images.iter().enumerate() {
            let ord = ord as i32;
            let (v, h);
            let emb: &(dyn ToSql + Sync) = match storage {
                Storage::Vector => {
                    v = Vector::from(im.vector.clone());
                    &v
                }
                Storage::Halfvec => {
                    h = pgvector::HalfVector::from_f32_slice(&im.vector);
                    &h
                }
            };
            let fields: [&(dyn ToSql + Sync); 4] = [&im.id, emb, &im.metadata, &im.thumbnail];
            let row: Vec<&(dyn ToSql + Sync)> = if with_ord {
                std::iter::once(&ord as &(dyn ToSql + Sync))
                    .chain(fields)
                    .collect()
            } else {
                fields.to_vec()
            };
            writer.as_mut().write(&row).await.map_err(db_error)?;
        }
        writer.as_mut().finish().await.map_err(db_error)?;
        Ok(())
    }

    async fn insert_rows(&self, images: Vec<NewImage>) -> Result<(), IndexError> {
        let n = images.len();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(db_error)?;
        let upsert = "ON CONFLICT (id) DO UPDATE SET embedding = EXCLUDED.embedding, \
                      metadata = EXCLUDED.metadata, thumbnail = EXCLUDED.thumbnail, \
                      updated_at = now()";
        let ty = self.storage.sql_type();
        if n >= COPY_ABOVE {
            let unique = {
                let mut seen = std::collections::HashSet::with_capacity(n);
                images.iter().all(|im| seen.insert(im.id.as_str()))
            };
            // A bulk load into what was an empty table: straight into the
            // table (no staging, no upsert), unless an id is there already.
            let mut done = false;
            if unique && self.deferred.load(Ordering::SeqCst) {
                tx.batch_execute("SAVEPOINT capivara_direct")
                    .await
                    .map_err(db_error)?;
                let target = "capivara_images (id, embedding, metadata, thumbnail)";
                match self
                    .copy_rows(&tx, target, &images, false, self.storage)
                    .await
                {
                    Ok(()) => done = true,
                    Err(_) => tx
                        .batch_execute("ROLLBACK TO SAVEPOINT capivara_direct")
                        .await
                        .map_err(db_error)?,
                }
            }
            if !done {
                tx.batch_execute(&format!(
                    "CREATE TEMP TABLE IF NOT EXISTS capivara_staging (ord int4, \
                     id text COLLATE \"C\", embedding vector({dim}), metadata jsonb, \
                     thumbnail bytea) ON COMMIT DROP",
                    dim = self.dim
                ))
                .await
                .map_err(db_error)?;
                let target = "capivara_staging (ord, id, embedding, metadata, thumbnail)";
                self.copy_rows(&tx, target, &images, true, Storage::Vector)
                    .await?;
                // Last writer wins within the batch too: one row per id (the
                // sort only when an id repeats).
                let pick = if unique {
                    "SELECT id"
                } else {
                    "SELECT DISTINCT ON (id) id"
                };
                let order = if unique { "" } else { "ORDER BY id, ord DESC" };
                tx.execute(
                    &format!(
                        "INSERT INTO capivara_images (id, embedding, metadata, thumbnail)
                         {pick}, embedding::{ty}, metadata, thumbnail
                         FROM capivara_staging {order} {upsert}"
                    ),
                    &[],
                )
                .await
                .map_err(db_error)?;
            }
        } else {
            let stmt = tx
                .prepare(&format!(
                    "INSERT INTO capivara_images (id, embedding, metadata, thumbnail)
                     VALUES ($1, $2::vector::{ty}, $3, $4) {upsert}"
                ))
                .await
                .map_err(db_error)?;
            for im in images {
                let v = Vector::from(im.vector);
                tx.execute(&stmt, &[&im.id, &v, &im.metadata, &im.thumbnail])
                    .await
                    .map_err(db_error)?;
            }
        }
        tx.commit().await.map_err(db_error)?;
        // Counted again soon; meanwhile an estimate.
        self.rows.fetch_add(n as i64, Ordering::Relaxed);
        Ok(())
    }

    async fn search_rows(&self, query: Vec<f32>, k: usize) -> Result<Vec<Hit>, IndexError> {
        let q = Vector::from(normalized(&query, self.dim)?);
        if k == 0 {
            return Ok(Vec::new());
        }
        let mut c = self.client().await?;
        let exact = self.rows(&c).await? <= self.opts.exact_search_below as i64;
        let ef = self.opts.ef_search.max(k).min(1000);
        let sql = format!(
            "SELECT id, metadata, score FROM (
                SELECT id, metadata, -(embedding <#> {q}) AS score
                FROM capivara_images ORDER BY embedding <#> {q} LIMIT $2) best
             ORDER BY score DESC, id",
            q = self.cast()
        );
        let params: [&(dyn ToSql + Sync); 2] = [&q, &(k as i64)];
        let rows = if !exact && ef == self.opts.ef_search {
            // The common case in one round trip: the connection's own
            // hnsw.ef_search (set when it was opened) and a cached statement.
            let stmt = c.prepare_cached(&sql).await.map_err(db_error)?;
            c.query(&stmt, &params).await.map_err(db_error)?
        } else {
            let tx = c.transaction().await.map_err(db_error)?;
            let setting = if exact {
                "SET LOCAL enable_indexscan = off".to_string()
            } else {
                format!("SET LOCAL hnsw.ef_search = {ef}")
            };
            tx.batch_execute(&setting).await.map_err(db_error)?;
            let rows = tx.query(&sql, &params).await.map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            rows
        };
        Ok(rows
            .into_iter()
            .map(|r| Hit {
                id: r.get(0),
                metadata: r.get(1),
                score: r.get::<_, f64>(2) as f32,
            })
            .collect())
    }
}

#[async_trait]
impl Backend for PgBackend {
    async fn begin_bulk(&self) -> Result<(), IndexError> {
        // Only an empty table: replicas serving a populated one keep their
        // index (without it their searches would scan every row).
        if self.len().await? == 0 {
            self.timed(async {
                let c = self.client().await?;
                c.batch_execute("DROP INDEX IF EXISTS capivara_images_embedding")
                    .await
                    .map_err(db_error)
            })
            .await?;
            self.deferred.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    async fn end_bulk(&self) -> Result<(), IndexError> {
        if self.deferred.swap(false, Ordering::SeqCst) {
            // A table filled by COPY has no statistics, no visibility map and
            // no hint bits: the first searches would set them (writes on the
            // read path, then autovacuum under load). Done once here, before
            // the HNSW index exists (so VACUUM has no index to scan).
            let started = Instant::now();
            let c = self.client().await?;
            c.batch_execute("VACUUM (ANALYZE) capivara_images")
                .await
                .map_err(db_error)?;
            tracing::info!(
                "{}: vacuumed and analysed in {:.1?}",
                self.shown,
                started.elapsed()
            );
            self.build_hnsw().await?;
        }
        Ok(())
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.shown, self.storage.sql_type())
    }

    async fn check(&self) -> Result<(), IndexError> {
        self.timed(async {
            let c = self.client().await?;
            c.simple_query("SELECT 1").await.map_err(db_error)?;
            Ok(())
        })
        .await
    }

    async fn fingerprint(&self) -> Result<Option<Fingerprint>, IndexError> {
        self.timed(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT value FROM capivara_meta WHERE key = 'fingerprint'",
                    &[],
                )
                .await
                .map_err(db_error)?;
            row.map(|r| serde_json::from_value(r.get::<_, Value>(0)))
                .transpose()
                .map_err(|e| IndexError::Corrupt(format!("the stored fingerprint: {e}")))
        })
        .await
    }

    async fn claim(&self, fp: &Fingerprint) -> Result<(), IndexError> {
        let value = serde_json::to_value(fp).map_err(|e| IndexError::Corrupt(e.to_string()))?;
        self.timed(async {
            let mut c = self.client().await?;
            let tx = c.transaction().await.map_err(db_error)?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
                .await
                .map_err(db_error)?;
            let row = tx
                .query_opt(
                    "SELECT value FROM capivara_meta WHERE key = 'fingerprint'",
                    &[],
                )
                .await
                .map_err(db_error)?;
            match row {
                Some(r) => {
                    let stored: Fingerprint = serde_json::from_value(r.get::<_, Value>(0))
                        .map_err(|e| IndexError::Corrupt(format!("the stored fingerprint: {e}")))?;
                    fp.check(&stored)?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO capivara_meta (key, value) VALUES ('fingerprint', $1)",
                        &[&value],
                    )
                    .await
                    .map_err(db_error)?;
                }
            }
            tx.commit().await.map_err(db_error)
        })
        .await
    }

    async fn len(&self) -> Result<usize, IndexError> {
        self.timed(async {
            let c = self.client().await?;
            let n: i64 = c
                .query_one("SELECT count(*) FROM capivara_images", &[])
                .await
                .map_err(db_error)?
                .get(0);
            self.rows.store(n, Ordering::Relaxed);
            Ok(n as usize)
        })
        .await
    }

    async fn insert(&self, images: Vec<NewImage>) -> Result<(), IndexError> {
        if images.is_empty() {
            return Ok(());
        }
        let images = self.prepare(images)?;
        self.timed(self.insert_rows(images)).await
    }

    async fn get(&self, id: &str) -> Result<Option<Value>, IndexError> {
        self.timed(async {
            let c = self.client().await?;
            let row = c
                .query_opt("SELECT metadata FROM capivara_images WHERE id = $1", &[&id])
                .await
                .map_err(db_error)?;
            Ok(row.map(|r| r.get(0)))
        })
        .await
    }

    async fn delete(&self, id: &str) -> Result<bool, IndexError> {
        validate_id(id)?;
        self.timed(async {
            let c = self.client().await?;
            let n = c
                .execute("DELETE FROM capivara_images WHERE id = $1", &[&id])
                .await
                .map_err(db_error)?;
            if n > 0 {
                self.rows.fetch_sub(n as i64, Ordering::Relaxed);
            }
            Ok(n > 0)
        })
        .await
    }

    async fn search(&self, query: Vec<f32>, k: usize) -> Result<Vec<Hit>, IndexError> {
        self.timed(self.search_rows(query, k)).await
    }

    async fn thumbnail(&self, id: &str) -> Result<Thumbnail, IndexError> {
        self.timed(async {
            let c = self.client().await?;
            let row = c
                .query_opt(
                    "SELECT thumbnail FROM capivara_images WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(db_error)?;
            Ok(match row {
                None => Thumbnail::NoImage,
                Some(r) => match r.get::<_, Option<Vec<u8>>>(0) {
                    Some(jpeg) => Thumbnail::Jpeg(jpeg),
                    None => Thumbnail::NotKept,
                },
            })
        })
        .await
    }

    async fn scan(
        &self,
        after: Option<String>,
        limit: usize,
    ) -> Result<Vec<StoredImage>, IndexError> {
        self.timed(async {
            let c = self.client().await?;
            let after = after.unwrap_or_default();
            let rows = c
                .query(
                    "SELECT id, embedding::vector, metadata, thumbnail FROM capivara_images
                     WHERE id > $1 ORDER BY id LIMIT $2",
                    &[&after, &(limit as i64)],
                )
                .await
                .map_err(db_error)?;
            Ok(rows
                .into_iter()
                .map(|r| StoredImage {
                    id: r.get(0),
                    vector: r.get::<_, Vector>(1).to_vec(),
                    metadata: r.get(2),
                    thumbnail: r.get(3),
                })
                .collect())
        })
        .await
    }

    async fn flush(&self) -> Result<(), IndexError> {
        Ok(()) // every acknowledged write was committed
    }
}

mod tls {
    //! TLS for the Postgres connection with rustls, in libpq's `sslmode`
    //! terms (tokio-postgres itself reads only disable/prefer/require).

    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
    use tokio_postgres_rustls::MakeRustlsConnect;

    /// What the URL asked for.
    #[derive(Debug, Clone)]
    pub enum Mode {
        Plain,
        /// Encrypt; check the chain against `roots` when given, and the
        /// host name when `full`.
        Tls {
            roots: Option<Vec<CertificateDer<'static>>>,
            verify: bool,
            full: bool,
        },
    }

    impl Mode {
        /// Takes `sslmode` and `sslrootcert` out of `url`; returns the rest
        /// (with `sslmode` as tokio-postgres reads it) and the mode.
        pub fn from_url(url: &str) -> Result<(String, Mode), String> {
            let (base, query) = match url.split_once('?') {
                Some((b, q)) => (b, q),
                None => (url, ""),
            };
            let mut sslmode = "prefer".to_string();
            let mut rootcert: Option<String> = None;
            let mut kept = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                match k {
                    "sslmode" => sslmode = v.to_string(),
                    "sslrootcert" => rootcert = Some(percent_decode(v)),
                    _ => kept.push(pair.to_string()),
                }
            }
            let roots = match &rootcert {
                Some(path) => {
                    let pem =
                        std::fs::read(path).map_err(|e| format!("sslrootcert {path}: {e}"))?;
                    let certs: Vec<CertificateDer<'static>> = rustls_pemfile_certs(&pem)
                        .map_err(|e| format!("sslrootcert {path}: {e}"))?;
                    if certs.is_empty() {
                        return Err(format!("sslrootcert {path}: no certificate in it"));
                    }
                    Some(certs)
                }
                None => None,
            };
            let (mode, pg_mode) = match sslmode.as_str() {
                "disable" => (Mode::Plain, "disable"),
                "allow" | "prefer" => (
                    Mode::Tls {
                        verify: roots.is_some(),
                        roots,
                        full: false,
                    },
                    "prefer",
                ),
                "require" => (
                    Mode::Tls {
                        verify: roots.is_some(),
                        roots,
                        full: false,
                    },
                    "require",
                ),
                "verify-ca" => (
                    Mode::Tls {
                        roots,
                        verify: true,
                        full: false,
                    },
                    "require",
                ),
                "verify-full" => (
                    Mode::Tls {
                        roots,
                        verify: true,
                        full: true,
                    },
                    "require",
                ),
                other => {
                    return Err(format!(
                    "unknown sslmode `{other}` (disable, prefer, require, verify-ca, verify-full)"
                ))
                }
            };
            kept.push(format!("sslmode={pg_mode}"));
            Ok((format!("{base}?{}", kept.join("&")), mode))
        }

        pub fn connector(&self) -> MakeRustlsConnect {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("rustls default protocol versions");
            let config = match self {
                Mode::Tls {
                    roots,
                    verify: true,
                    full,
                } => {
                    let mut store = RootCertStore::empty();
                    match roots {
                        Some(certs) => {
                            for c in certs {
                                let _ = store.add(c.clone());
                            }
                        }
                        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
                    }
                    let store = Arc::new(store);
                    if *full {
                        builder.with_root_certificates(store).with_no_client_auth()
                    } else {
                        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                            store,
                            provider.clone(),
                        )
                        .build()
                        .expect("a verifier over non-empty roots");
                        builder
                            .dangerous()
                            .with_custom_certificate_verifier(Arc::new(ChainOnly { inner }))
                            .with_no_client_auth()
                    }
                }
                // Plain connections never use it; `require` without roots
                // encrypts without checking the certificate, as libpq does.
                _ => builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
                    .with_no_client_auth(),
            };
            MakeRustlsConnect::new(config)
        }
    }

    fn percent_decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The certificates of a PEM file.
    fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
        use rustls::pki_types::pem::PemObject;
        CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("not PEM certificates ({e:?})"))
    }

    /// `verify-ca`: the chain must lead to a trusted root; the name is not
    /// checked.
    #[derive(Debug)]
    struct ChainOnly {
        inner: Arc<rustls::client::WebPkiServerVerifier>,
    }

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName,
                ))
                | Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    /// `require` without a root certificate: encrypted, not authenticated
    /// (libpq's meaning of `sslmode=require`).
    #[derive(Debug)]
    struct AnyCertificate {
        provider: Arc<rustls::crypto::CryptoProvider>,
    }

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_as_libpq_spells_them() {
        let u = PgUrl::parse("postgres://ana:s3cret@db.example:6543/fotos?sslmode=verify-full")
            .unwrap();
        assert_eq!(u.shown, "postgres db.example:6543/fotos as ana");
        assert!(!format!("{u:?}").contains("s3cret"));
        assert!(matches!(
            u.tls,
            tls::Mode::Tls {
                verify: true,
                full: true,
                ..
            }
        ));
        let u = PgUrl::parse("postgres://127.0.0.1/x?sslmode=disable").unwrap();
        assert!(matches!(u.tls, tls::Mode::Plain));
        let u = PgUrl::parse("postgresql://h/db?sslmode=require&application_name=a").unwrap();
        assert!(matches!(u.tls, tls::Mode::Tls { verify: false, .. }));
        for bad in [
            "postgres://h/db?sslmode=sometimes",
            "mysql://h/db",
            "postgres://h/db?sslrootcert=/no/such/file.pem",
        ] {
            assert!(PgUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
