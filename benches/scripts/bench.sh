#!/usr/bin/env bash
# Protocol-level throughput of a release `garret serve`, measured by
# garret-bench (benches/src/bin/bench.rs) over REAPI gRPC and the Nix/Attic
# HTTP API:
#   benches/scripts/bench.sh [SCENARIO...]        (default: all, in order)
#   benches/scripts/bench.sh bytestream-write bytestream-read
#   SIZE_MIB=512 RUNS=5 benches/scripts/bench.sh bytestream-write
#   benches/scripts/bench.sh attic-push nix-copy-put narinfo-hit narinfo-miss \
#       nar-download nar-download-8 ac-get ac-update
# Scenarios:
#   REAPI CAS:    bytestream-write, bytestream-write-zstd, bytestream-read,
#                 batch-update-4k, batch-read-4k, find-missing-10k
#   Nix / Attic:  attic-push (upload-path; compressible, incompressible and
#                 dedup rows), nix-copy-put (`nix copy --to http://` PUTs),
#                 narinfo-hit, narinfo-miss (req/s, p50/p99), nar-download,
#                 nar-download-8 (1 and 8 streams; MB/s, time to first byte)
#   REAPI AC:     ac-update, ac-get (req/s, p50/p99)
# Builds the release `garret` and the release garret-bench (the client must
# not be the bottleneck), starts `garret serve` on a fresh data dir
# (embedded default: SQLite + local disk; BACKEND=postgres-s3: a throwaway
# Postgres 15 and the tests' S3 server, see server.sh) at a free 127.0.0.1
# port, and runs
#   garret-bench --url http://127.0.0.1:PORT --token ADMIN_JWT --pid PID \
#       --size-mib "$SIZE_MIB" --message-kib "$MESSAGE_KIB" --runs "$RUNS" \
#       --nar-mib "$NAR_MIB" --paths "$PATHS" --requests "$REQUESTS" \
#       --concurrency "$CONCURRENCY" SCENARIO...
# REAPI scenarios use the cache `default`, which the server creates (private)
# on first start for requests without an instance name; the Nix scenarios
# create the cache `garret-bench` through the Attic API. The admin token the
# server prints on first start is the bearer token. Prints garret-bench's Markdown table, then stops
# the server. `garret-bench` with a bad argument lists the scenarios.
# Environment: BACKEND (embedded or postgres-s3), GARRET_BIN (a server
# binary to run instead of this tree's), SIZE_MIB (128), MESSAGE_KIB (1024), RUNS (3), JSON (a file
# for garret-bench's --json), KEEP_LOG=1 prints the server's log at the end;
# for the Nix and AC scenarios NAR_MIB (200), PATHS (1, per push and content
# variant), REQUESTS (20000 per run) and CONCURRENCY (64).
# Exit status: garret-bench's (1 if a scenario failed), 2 if the server died.
set -euo pipefail
cd "$(dirname "$0")/../.."
. benches/scripts/build.sh

. benches/scripts/server.sh
start_server
url=http://$listen
echo "garret serve at $url ($backend_text); ${GARRET_BIN:-$(git rev-parse --short HEAD)}; $(date -u +%FT%TZ); $(nproc) cores"
echo

json_args=()
[ -n "${JSON:-}" ] && json_args=(--json "$JSON")
rc=0
"$bench" --url "$url" --token "$admin" --pid "$server" \
  --size-mib "${SIZE_MIB:-128}" --message-kib "${MESSAGE_KIB:-1024}" --runs "${RUNS:-3}" \
  --nar-mib "${NAR_MIB:-200}" --paths "${PATHS:-1}" --requests "${REQUESTS:-20000}" \
  --concurrency "${CONCURRENCY:-64}" "${json_args[@]}" "$@" || rc=$?
if ! alive; then
  echo
  echo "- the server died: $(grep -m1 -E 'memory allocation|panicked at|ERROR' "$work/log.1" || echo "no message in its log")"
  rc=2
fi
[ "${KEEP_LOG:-0}" = 1 ] && cat "$work/log.1"
exit "$rc"
