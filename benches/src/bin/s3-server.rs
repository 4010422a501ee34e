//! `garret-s3`: the S3 server garret's tests run in-process (s3s-fs over a
//! directory, SigV4 auth, one bucket), as a process of its own, so the
//! benchmark scripts can run a release `garret serve` against S3
//! (`BACKEND=postgres-s3`, see `benches/scripts/server.sh`):
//!
//! ```text
//! garret-s3 ROOT BUCKET
//! ```
//!
//! Serves `ROOT` (created if missing, the bucket a directory in it) at a
//! free 127.0.0.1 port and prints, once listening, the variables that point
//! `garret serve` at it, one `NAME=value` a line:
//! `GARRET_STORAGE`, `GARRET_S3_ENDPOINT`, `GARRET_S3_BUCKET`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`. It runs until killed, or
//! until its parent exits: a script that dies without its cleanup leaves no
//! server behind.
//!
//! s3s-fs is a test server: every object is a file, and a GET opens and
//! reads it on the blocking pool. Its latency on small objects is its own,
//! not what an S3 service would give.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use garret_store::testing::S3TestServer;

/// How often the parent's liveness is checked: a leftover server costs
/// nothing but a port, so a second is soon enough.
const PARENT_CHECK: Duration = Duration::from_secs(1);

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [root, bucket] = args.as_slice() else {
        eprintln!("usage: garret-s3 ROOT BUCKET");
        return ExitCode::from(64);
    };
    let parent = std::os::unix::process::parent_id();
    let server = match S3TestServer::start(&PathBuf::from(root), bucket).await {
        Ok(server) => server,
        Err(e) => {
            eprintln!("garret-s3: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = &server.config;
    let lines = [
        ("GARRET_STORAGE", Some("s3")),
        ("GARRET_S3_ENDPOINT", config.endpoint.as_deref()),
        ("GARRET_S3_BUCKET", Some(config.bucket.as_str())),
        ("AWS_ACCESS_KEY_ID", config.access_key_id.as_deref()),
        ("AWS_SECRET_ACCESS_KEY", config.secret_access_key.as_deref()),
    ];
    let mut out = std::io::stdout().lock();
    for (name, value) in lines {
        let _ = writeln!(out, "{name}={}", value.unwrap_or_default());
    }
    let _ = out.flush();
    drop(out);
    // Reparented (to init or a subreaper): the script that started it is gone.
    while std::os::unix::process::parent_id() == parent {
        tokio::time::sleep(PARENT_CHECK).await;
    }
    ExitCode::SUCCESS
}
