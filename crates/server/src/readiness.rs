//! Whether this replica can serve: its database and its blob store answer.
//!
//! Probes (`/readyz`, gRPC health) read the result of the last check instead
//! of each making a round trip: a probe every few seconds from every
//! kubelet and load balancer must not become load on Postgres or S3, and a
//! check that hangs must not hang the probe. A background task checks every
//! interval, each dependency with its own time limit; a result older than
//! three intervals counts as unready, so a stuck checker is noticed too.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use garret_meta::Meta;
use garret_store::backend::BackendError;
use garret_store::{Backend, ObjectStore as _};

/// Longest wait for one dependency's answer.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// A key no object has: reading it proves the store answers (a "not found"
/// is an answer).
const PROBE_KEY: &str = "health/probe";

/// The last check's result, shared by the checker and every probe.
#[derive(Debug, Clone)]
pub struct Readiness {
    last: Arc<Mutex<Option<Checked>>>,
    interval: Duration,
}

#[derive(Debug, Clone)]
struct Checked {
    at: Instant,
    /// What is unreachable, and why; empty when ready.
    problems: Vec<String>,
}

/// What a probe answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    pub ready: bool,
    pub problems: Vec<String>,
}

impl Readiness {
    /// Checks `meta` and `backend` once, so that a replica whose
    /// dependencies answer is ready as soon as it serves, then every
    /// `interval` on the current runtime, for as long as it runs.
    pub async fn start(meta: Meta, backend: Backend, interval: Duration) -> Self {
        let readiness = Self {
            last: Arc::default(),
            interval,
        };
        readiness.record(&meta, &backend).await;
        let shared = readiness.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                shared.record(&meta, &backend).await;
            }
        });
        readiness
    }

    /// Checks once and keeps the result for the probes.
    async fn record(&self, meta: &Meta, backend: &Backend) {
        let problems = check(meta, backend).await;
        if !problems.is_empty() {
            tracing::warn!(?problems, "not ready");
        }
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Checked {
            at: Instant::now(),
            problems,
        });
    }

    /// The last check's verdict, if it is recent.
    pub fn status(&self) -> Status {
        let last = self
            .last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match last {
            None => Status {
                ready: false,
                problems: vec!["not checked yet".into()],
            },
            Some(checked) if checked.at.elapsed() > 3 * self.interval => Status {
                ready: false,
                problems: vec![format!(
                    "the last check is {} s old",
                    checked.at.elapsed().as_secs()
                )],
            },
            Some(checked) => Status {
                ready: checked.problems.is_empty(),
                problems: checked.problems,
            },
        }
    }
}

/// Asks each dependency once, within [`CHECK_TIMEOUT`].
async fn check(meta: &Meta, backend: &Backend) -> Vec<String> {
    let (database, store) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, meta.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, backend.get_range(PROBE_KEY, 0..1)),
    );
    let mut problems = Vec::new();
    match database {
        Ok(Ok(())) => {}
        Ok(Err(e)) => problems.push(format!("database: {e}")),
        Err(_) => problems.push("database: no answer within 2 s".into()),
    }
    match store {
        Ok(Ok(_) | Err(BackendError::NotFound(_) | BackendError::Short { .. })) => {}
        Ok(Err(e)) => problems.push(format!("blob store: {e}")),
        Err(_) => problems.push("blob store: no answer within 2 s".into()),
    }
    problems
}
