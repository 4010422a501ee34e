//! The record of garbage collection runs: the last one and the last that
//! succeeded, whichever process ran them, so that a `garret gc` CronJob's
//! runs are visible to every server (its metrics) without a push gateway.
//! Two rows at most: recording a run replaces the previous record.

use crate::{BeginWrite as _, Meta, Result, on_reader, on_writer};

/// One recorded run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcRun {
    /// When it ended, in unix seconds.
    pub finished_at: i64,
    pub succeeded: bool,
    /// Its report as JSON, as the caller made it; `None` for a run that
    /// failed before it had one. Opaque here: the report is the server's.
    pub report: Option<String>,
}

/// The runs [`Meta::gc_runs`] knows of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcRuns {
    pub last: Option<GcRun>,
    pub last_success: Option<GcRun>,
}

type GcRunRow = (String, i64, bool, Option<String>);

impl Meta {
    /// Records `run` as the last run, and as the last success if it
    /// succeeded.
    pub async fn record_gc_run(&self, run: &GcRun) -> Result<()> {
        let outcomes: &[&str] = if run.succeeded {
            &["last", "last_success"]
        } else {
            &["last"]
        };
        on_writer!(self, |pool| async {
            let mut tx = pool.begin_write().await?;
            for outcome in outcomes {
                sqlx::query(
                    "INSERT INTO gc_runs (outcome, finished_at, succeeded, report) \
                     VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (outcome) DO UPDATE SET finished_at = excluded.finished_at, \
                       succeeded = excluded.succeeded, report = excluded.report",
                )
                .bind(*outcome)
                .bind(run.finished_at)
                .bind(run.succeeded)
                .bind(run.report.as_deref())
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// The last recorded run and the last successful one.
    pub async fn gc_runs(&self) -> Result<GcRuns> {
        let rows: Vec<GcRunRow> = on_reader!(self, |pool| async {
            sqlx::query_as("SELECT outcome, finished_at, succeeded, report FROM gc_runs")
                .fetch_all(pool)
                .await
        })?;
        let mut runs = GcRuns::default();
        for (outcome, finished_at, succeeded, report) in rows {
            let run = Some(GcRun {
                finished_at,
                succeeded,
                report,
            });
            match outcome.as_str() {
                "last" => runs.last = run,
                _ => runs.last_success = run,
            }
        }
        Ok(runs)
    }
}
