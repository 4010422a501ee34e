use std::path::Path;

use garret_meta::{Database, Meta, MetaError};
use sqlx::migrate::Migrator;

use crate::support::{Raw, TestDb, both};

both! {
    async fn migrations_apply_and_rerun(db: TestDb) {
        // `support` migrated once already; again is a no-op.
        db.migrate().await.unwrap();
        for table in [
            "caches", "chunks", "blobs", "blob_chunks", "nix_objects", "cas_entries",
            "action_results", "upload_sessions", "upload_session_chunks", "nix_uploads",
        ] {
            assert_eq!(db.count(table).await, 0, "{table}");
        }
    }

    async fn migrations_match_directory(db: TestDb) {
        // What `sqlx::migrate!` would have embedded: every file, same
        // versions, descriptions and checksums.
        let dir = match db.database() {
            Database::Postgres => "postgres",
            Database::Sqlite => "sqlite",
        };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations").join(dir);
        let expected: Vec<(i64, String, Vec<u8>)> = Migrator::new(dir)
            .await
            .unwrap()
            .iter()
            .map(|m| (m.version, m.description.to_string(), m.checksum.to_vec()))
            .collect();
        let sql = "SELECT version, description, checksum FROM _sqlx_migrations ORDER BY version";
        let applied: Vec<(i64, String, Vec<u8>)> = match &db.raw {
            Raw::Postgres(pool) => sqlx::query_as(sql).fetch_all(pool).await,
            Raw::Sqlite(pool) => sqlx::query_as(sql).fetch_all(pool).await,
        }
        .unwrap();
        assert!(!expected.is_empty());
        assert_eq!(applied, expected);
    }

    async fn dollar_placeholders_bind_by_number(db: TestDb) {
        // Queries reuse `$1` and list parameters out of order; SQLite must
        // bind `$N` by its number, not by order of appearance.
        let sql = "SELECT $2, $1, $2, $11 + $10";
        let row: (i64, i64, i64, i64) = match &db.raw {
            Raw::Postgres(pool) => {
                let mut q = sqlx::query_as(sql);
                for i in 1..=11_i64 {
                    q = q.bind(i * 10);
                }
                q.fetch_one(pool).await
            }
            Raw::Sqlite(pool) => {
                let mut q = sqlx::query_as(sql);
                for i in 1..=11_i64 {
                    q = q.bind(i * 10);
                }
                q.fetch_one(pool).await
            }
        }
        .unwrap();
        assert_eq!(row, (20, 10, 20, 210));
    }

    async fn connect_reopens_existing_database(db: TestDb) {
        let cache = db.cache_named("reopen").await;
        db.close().await;
        let again = Meta::connect(&db.url).await.unwrap();
        again.migrate().await.unwrap();
        assert_eq!(again.cache("reopen").await.unwrap().id, cache);
    }
}

#[tokio::test]
async fn connect_rejects_other_urls() {
    for url in [
        "mysql://localhost/db",
        "sqlite::memory:",
        "/var/lib/garret.db",
    ] {
        let err = Meta::connect(url).await.unwrap_err();
        assert!(matches!(err, MetaError::Invalid(_)), "{url}: {err}");
    }
}
