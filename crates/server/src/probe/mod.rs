//! `garret probe`: the attachment check operators run from every runner
//! pod and developer machine. A client of garret's two front doors, it
//! checks what a Nix substituter, `attic push` and Bazel each need: the
//! cache answers (and over TLS, if asked), exists, has the expected public
//! key and signs what it serves, and, given a token that may push, takes a
//! write and gives it back. One [`Check`] per step; see [`nix`] and
//! [`reapi`] for the steps and [`target`] for where a bare run looks.
//!
//! Every call has a timeout and every answer a size bound: the probe may
//! be pointed at anything.

mod canary;
mod http;
mod netrc;
mod nix;
mod nix_conf;
mod reapi;
mod reason;
mod report;
mod target;

use std::time::Duration;

pub use report::{Check, Report, Status};
pub use target::{Flags, NixTarget, ReapiTarget, Target, TargetError};

/// Probes the Nix cache and the REAPI endpoint of `target`, in that order.
#[tracing::instrument(skip_all)]
pub async fn run(target: &Target, timeout: Duration) -> Report {
    let mut report = Report::default();
    if let Some(nix) = &target.nix {
        let token = target.token.as_ref().map(|t| t.value.clone());
        match http::Http::new(token, timeout) {
            Ok(http) => nix::probe(&http, target, nix, &mut report).await,
            Err(why) => report.fail("nix.reach", why),
        }
    }
    if let Some(reapi) = &target.reapi {
        reapi::probe(target, reapi, timeout, &mut report).await;
    }
    report
}
