//! The SQL files of `migrations/{postgres,sqlite}`, compiled into the binary.
//!
//! `sqlx::migrate!` would do this, but it lives behind sqlx's `macros`
//! feature, whose proc-macro compiles sqlx's drivers and the bundled SQLite a
//! second time for the host. Listing the files here costs a line per
//! migration instead; the `migrations_match_directory` test fails if this list
//! and the directories disagree, and versions, descriptions and checksums are
//! derived exactly as `migrate!` derives them, so either can apply a database
//! the other created.

use std::borrow::Cow;
use std::pin::Pin;

use sqlx::error::BoxDynError;
use sqlx::migrate::{Migration, MigrationSource, MigrationType, Migrator};

/// Files as `(name, sql)`, in version order.
#[derive(Debug)]
struct Embedded(&'static [(&'static str, &'static str)]);

const POSTGRES: Embedded = Embedded(&[
    (
        "0001_initial.sql",
        include_str!("../../../migrations/postgres/0001_initial.sql"),
    ),
    (
        "0002_nix_uploads.sql",
        include_str!("../../../migrations/postgres/0002_nix_uploads.sql"),
    ),
    (
        "0003_upload_sessions.sql",
        include_str!("../../../migrations/postgres/0003_upload_sessions.sql"),
    ),
    (
        "0004_packs.sql",
        include_str!("../../../migrations/postgres/0004_packs.sql"),
    ),
    (
        "0005_gc.sql",
        include_str!("../../../migrations/postgres/0005_gc.sql"),
    ),
    (
        "0006_gc_runs.sql",
        include_str!("../../../migrations/postgres/0006_gc_runs.sql"),
    ),
]);

const SQLITE: Embedded = Embedded(&[
    (
        "0001_initial.sql",
        include_str!("../../../migrations/sqlite/0001_initial.sql"),
    ),
    (
        "0002_nix_uploads.sql",
        include_str!("../../../migrations/sqlite/0002_nix_uploads.sql"),
    ),
    (
        "0003_upload_sessions.sql",
        include_str!("../../../migrations/sqlite/0003_upload_sessions.sql"),
    ),
    (
        "0004_packs.sql",
        include_str!("../../../migrations/sqlite/0004_packs.sql"),
    ),
    (
        "0005_gc.sql",
        include_str!("../../../migrations/sqlite/0005_gc.sql"),
    ),
    (
        "0006_gc_runs.sql",
        include_str!("../../../migrations/sqlite/0006_gc_runs.sql"),
    ),
]);

pub(crate) async fn postgres() -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(POSTGRES).await
}

pub(crate) async fn sqlite() -> Result<Migrator, sqlx::migrate::MigrateError> {
    Migrator::new(SQLITE).await
}

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<Migration>, BoxDynError>> + Send + 'static>> {
        Box::pin(async move {
            self.0
                .iter()
                .map(|&(name, sql)| {
                    // `<version>_<description>.sql`, as sqlx's directory source reads it.
                    let (version, description) = name
                        .strip_suffix(".sql")
                        .and_then(|stem| stem.split_once('_'))
                        .ok_or_else(|| {
                            format!("migration file {name} is not <version>_<name>.sql")
                        })?;
                    let version: i64 = version.parse()?;
                    Ok(Migration::new(
                        version,
                        Cow::Owned(description.replace('_', " ")),
                        MigrationType::Simple,
                        Cow::Borrowed(sql),
                        false,
                    ))
                })
                .collect()
        })
    }
}
