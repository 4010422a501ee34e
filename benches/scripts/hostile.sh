#!/usr/bin/env bash
# Hostile inputs against a release `garret serve`, with the server's peak RSS
# after each (issue 10: it must stay under 300 MiB):
#   benches/scripts/hostile.sh [ATTACK...]   (default: all, in order)
# Starts the server on a fresh data dir (embedded SQLite + local disk) at a
# free 127.0.0.1 port, creates the public caches `hostile` (Nix) and
# `default` (Bazel), then runs garret-hostile once per attack. It prints one
# Markdown table row per attack; attack names and what they do:
# `garret-hostile` without arguments. Each attack gets a freshly started
# server (same data dir and port), so its peak is its own and not what an
# earlier attack left in the allocator; SAME_SERVER=1 runs them all on one
# server instead (restarted only if one kills it), which is the issue's
# "through items 2-11" taken literally: RSS before then shows what is left.
# Exit status: 0 all passed, 1 a bar was exceeded, 2 the server died.
# BAR_MIB (300) and HOLD_SECS (5, how long stalled requests are held) can be
# set in the environment.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p garret-server --bin garret
# The harness only generates load; its dependencies are optimised even in
# the dev profile, and building it there reuses the test build.
cargo build -q -p garret-benches --bin garret-hostile
target=${CARGO_TARGET_DIR:-target}
bin=$target/release/garret
hostile=$target/debug/garret-hostile
attacks=("$@")
[ ${#attacks[@]} -gt 0 ] || attacks=(2a 2b 3 4 5 6 7a 7b 8a 8b 9 10 11)

. benches/scripts/server.sh
start_server
url=http://$listen
curl -sf -o /dev/null -X POST -H "Authorization: Bearer $admin" \
  -d '{"keypair":"Generate","is_public":true}' "$url/_api/v1/cache-config/hostile"
# The first start created `default` (private); the attacks need it public.
curl -sf -o /dev/null -X PATCH -H "Authorization: Bearer $admin" \
  -d '{"is_public":true}' "$url/_api/v1/cache-config/default"
echo "garret serve at $url; bar ${BAR_MIB:-300} MiB; $([ "${SAME_SERVER:-0}" = 1 ] && echo "one server for all attacks" || echo "a fresh server per attack"); $(git rev-parse --short HEAD); $(date -u +%FT%TZ)"
echo

"$hostile" --header --bar-mib "${BAR_MIB:-300}"
status=0
notes=()
for attack in "${attacks[@]}"; do
  if ! alive; then
    start_server
  elif [ "${SAME_SERVER:-0}" != 1 ] && [ "$attack" != "${attacks[0]}" ]; then
    stop_server
    start_server
  fi
  rc=0
  # Attack 6 opens 1100 connections: the harness gets the file descriptors
  # it needs, the server keeps the limit it was started with.
  (
    ulimit -Sn "$(ulimit -Hn)" 2>/dev/null || true
    exec "$hostile" --url "$url" --pid "$server" --token "$admin" --cache hostile \
      --bar-mib "${BAR_MIB:-300}" --hold-secs "${HOLD_SECS:-5}" "$attack"
  ) || rc=$?
  [ "$rc" -gt "$status" ] && status=$rc
  if [ "$rc" -eq 2 ]; then
    why=$(grep -m1 -E 'memory allocation|panicked at|ERROR' "$work/log.$starts" || true)
    notes+=("attack $attack: the server died: ${why:-no message in its log}")
  fi
done
echo
for note in "${notes[@]}"; do echo "- $note"; done
exit "$status"
