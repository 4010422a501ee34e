//! What a probe found: one line per check, for people (`PASS name:
//! detail`) and for tools (`--json`).

use std::fmt;

use serde::Serialize;

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Pass,
    Fail,
    /// Not run, and not a failure: what it needs (a push token, a known
    /// path, an expected key, an earlier check) is missing. The detail says which.
    Skip,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pass => "PASS",
            Self::Fail => "FAIL",
            Self::Skip => "SKIP",
        })
    }
}

/// One check: a stable name (`nix.public-key`), its status and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
}

/// Every check of one probe, in the order they ran.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn pass(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Status::Pass, detail.into());
    }

    pub fn fail(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Status::Fail, detail.into());
    }

    pub fn skip(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Status::Skip, detail.into());
    }

    /// Records a check that either passed with a detail or failed with a reason.
    pub fn record(&mut self, name: &'static str, outcome: Result<String, String>) {
        match outcome {
            Ok(detail) => self.pass(name, detail),
            Err(reason) => self.fail(name, reason),
        }
    }

    fn push(&mut self, name: &'static str, status: Status, detail: String) {
        tracing::debug!(check = name, %status, %detail, "probe check");
        self.checks.push(Check {
            name,
            status,
            detail,
        });
    }

    pub fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// No check failed (skipped ones are not failures).
    pub fn passed(&self) -> bool {
        self.count(Status::Fail) == 0
    }

    /// The report as one JSON object: `{"checks": [{"name", "status",
    /// "detail"}], "passed", "failed", "skipped"}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "checks": self.checks,
            "passed": self.count(Status::Pass),
            "failed": self.count(Status::Fail),
            "skipped": self.count(Status::Skip),
        })
    }
}

/// One line per check, then a summary line.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for check in &self.checks {
            writeln!(f, "{} {}: {}", check.status, check.name, check.detail)?;
        }
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.count(Status::Pass),
            self.count(Status::Fail),
            self.count(Status::Skip)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_json_agree() {
        let mut report = Report::default();
        report.pass("nix.reach", "HTTP 200");
        report.record("nix.public-key", Err("wrong key".into()));
        report.skip("nix.canary", "no push token");
        assert!(!report.passed());
        assert_eq!(
            report.to_string(),
            "PASS nix.reach: HTTP 200\nFAIL nix.public-key: wrong key\n\
             SKIP nix.canary: no push token\n1 passed, 1 failed, 1 skipped"
        );
        let json = report.to_json();
        assert_eq!(json["checks"][1]["status"], "FAIL");
        assert_eq!(json["checks"][1]["name"], "nix.public-key");
        assert_eq!(json["failed"], 1);
    }
}
