//! The Postgres test harness itself (tests/common/postgres.rs): a real
//! server with pgvector, an HNSW inner-product index, a crash-stop and a
//! restart that keeps committed rows. Skips without the binaries, except
//! under CI / `CAPIVARA_REQUIRE_PG=1` (see `.ci/run`).

mod common;

use common::postgres::PgServer;
use tokio_postgres::{Client, NoTls};

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// Ids and inner-product distances (`<#>`, the negated dot product) of the
/// `k` rows nearest `query`, through the HNSW index.
async fn nearest(client: &Client, column: &str, query: &str, k: i64) -> Vec<(i64, f64)> {
    let ty = if column == "half" {
        "halfvec"
    } else {
        "vector"
    };
    let sql = format!(
        "SELECT id, ({column} <#> $1::text::{ty})::float8 FROM items \
         ORDER BY {column} <#> $1::text::{ty} LIMIT $2"
    );
    client
        .query(&sql, &[&query, &k])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgvector_hnsw_survives_an_immediate_stop() {
    let Some(mut pg) = PgServer::start_or_skip() else {
        return;
    };
    assert!(pg.url().starts_with("postgres://postgres@127.0.0.1:"));
    let client = connect(&pg.url()).await;
    client
        .batch_execute(
            "CREATE EXTENSION vector;
             CREATE TABLE items (id bigint PRIMARY KEY, embedding vector(3), half halfvec(3));
             CREATE INDEX items_hnsw ON items USING hnsw (embedding vector_ip_ops);
             CREATE INDEX items_half_hnsw ON items USING hnsw (half halfvec_ip_ops);",
        )
        .await
        .unwrap();
    let version: String = client
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'vector'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(version.starts_with("0."), "pgvector {version}");

    let rows: [(i64, &str); 4] = [
        (1, "[1,0,0]"),
        (2, "[0,1,0]"),
        (3, "[0.6,0.8,0]"),
        (4, "[0,0,1]"),
    ];
    for (id, v) in rows {
        client
            .execute(
                "INSERT INTO items VALUES ($1, $2::text::vector, $2::text::halfvec)",
                &[&id, &v],
            )
            .await
            .unwrap();
    }
    // Small tables would be scanned: make the planner take the index.
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let plan: Vec<String> = client
        .query(
            "EXPLAIN SELECT id FROM items ORDER BY embedding <#> '[1,0,0]' LIMIT 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter().any(|l| l.contains("items_hnsw")),
        "the HNSW index is not used: {plan:?}"
    );
    let hits = nearest(&client, "embedding", "[1,0,0]", 2).await;
    assert_eq!(hits.iter().map(|h| h.0).collect::<Vec<_>>(), [1, 3]);
    assert!((hits[0].1 + 1.0).abs() < 1e-6 && (hits[1].1 + 0.6).abs() < 1e-6);
    let half = nearest(&client, "half", "[0,1,0]", 2).await;
    assert_eq!(half.iter().map(|h| h.0).collect::<Vec<_>>(), [2, 3]);
    assert!((half[1].1 + 0.8).abs() < 1e-3, "halfvec distance {half:?}");
    drop(client);

    // A crash-stop (no checkpoint), then WAL replay on the same port.
    let port = pg.port();
    pg.stop_immediate();
    assert!(
        tokio_postgres::connect(&pg.url(), NoTls).await.is_err(),
        "still answering after stop_immediate"
    );
    pg.start_again();
    assert_eq!(pg.port(), port);
    let client = connect(&pg.url()).await;
    let n: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 4);
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .unwrap();
    let again = nearest(&client, "embedding", "[1,0,0]", 2).await;
    assert_eq!(again, hits);

    // A clean stop and start keep it too; the log is there to read.
    drop(client);
    pg.stop();
    pg.start_again();
    assert_eq!(pg.psql("SELECT count(*) FROM items"), "4");
    assert!(
        pg.log().contains("database system is ready"),
        "{}",
        pg.log()
    );
    assert!(pg.data_dir().join("PG_VERSION").is_file());
    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn shared_server_gives_each_test_its_own_database() {
    let Some(pg) = PgServer::shared() else {
        return;
    };
    let a = pg.create_database();
    let b = pg.create_database();
    assert_ne!(a, b);
    let db = |url: &str| url.rsplit('/').next().unwrap().to_string();
    pg.psql_on(&db(&a), "CREATE TABLE t (x int); INSERT INTO t VALUES (7)");
    assert_eq!(pg.psql_on(&db(&a), "SELECT x FROM t"), "7");
    assert_eq!(
        pg.psql_on(
            &db(&b),
            "SELECT count(*) FROM pg_tables WHERE tablename = 't'"
        ),
        "0"
    );
    assert!(std::ptr::eq(pg, PgServer::shared().unwrap()));
}
