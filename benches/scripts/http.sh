#!/usr/bin/env bash
# End-to-end throughput of a release `garret serve` (embedded SQLite + local
# disk) driven over loopback by curl, the way clients use it:
#   benches/scripts/http.sh [DIR]   (default DIR: /usr/lib/jvm, real binaries)
# DIR is archived as a NAR and pushed through Attic's upload-path, pushed
# again under another path (deduplicated: proof of possession only), fetched
# as Nix does (stored zstd frames), then stored and fetched through Bazel's
# HTTP CAS. Prints MiB/s per step and the server's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${1:-/usr/lib/jvm}
cargo build --release -q -p garret-server --bin garret
bin=${CARGO_TARGET_DIR:-target}/release/garret
work=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

GARRET_DATA_DIR=$work/data GARRET_LISTEN=127.0.0.1:0 NO_COLOR=1 \
  "$bin" serve >"$work/out" 2>"$work/log" &
server=$!
until grep -qs "address=" "$work/log"; do
  kill -0 "$server" # fails the script if the server died
  sleep 0.1
done
url=http://$(grep -o 'address=[^ ]*' "$work/log" | head -1 | cut -d= -f2)
admin=$(grep '^ey' "$work/out")
auth="Authorization: Bearer $admin"
curl -sf -X POST -H "$auth" -d '{"keypair":"Generate"}' "$url/_api/v1/cache-config/bench"

"$bin" nar dump "$src" >"$work/a.nar"
read -r nar_hash nar_size < <("$bin" nar hash "$src")
mib=$(awk -v s="$nar_size" 'BEGIN { printf "%.0f", s / 1048576 }')
echo "NAR of $src: $mib MiB"

rate() { awk -v s="$nar_size" -v t="$1" 'BEGIN { printf "%7.1f MiB/s  (%.2f s)", s / 1048576 / t, t }'; }

upload() { # store-path hash
  local info
  info=$(printf '{"cache":"bench","store_path_hash":"%s","store_path":"/nix/store/%s-bench","references":[],"system":null,"deriver":null,"sigs":[],"ca":null,"nar_hash":"%s","nar_size":%s}' \
    "$1" "$1" "$nar_hash" "$nar_size")
  curl -sf -o "$work/reply" -w '%{time_total}' -X PUT -H "$auth" -H "X-Attic-Nar-Info: $info" \
    -H 'Content-Type: application/octet-stream' --data-binary "@$work/a.nar" "$url/_api/v1/upload-path"
}

# Server CPU seconds (user + system), to tell CPU-bound from I/O-bound.
cpu() { awk '{ printf "%.1f", ($14 + $15) / 100 }' "/proc/$server/stat"; }
sys() { awk '{ printf "%.1f", $15 / 100 }' "/proc/$server/stat"; }
before=$(cpu); sys_before=$(sys)
t=$(upload 00000000000000000000000000000000)
echo "attic upload-path, new:          $(rate "$t")  $(cat "$work/reply")"
echo "  server CPU during it: $(awk -v a="$before" -v b="$(cpu)" 'BEGIN { printf "%.1f", b - a }') s, of which system $(awk -v a="$sys_before" -v b="$(sys)" 'BEGIN { printf "%.1f", b - a }') s"
t=$(upload 11111111111111111111111111111111)
echo "attic upload-path, same NAR:     $(rate "$t")  $(cat "$work/reply")"
# Downloads are timed into /dev/null (a client's disk is not ours to
# measure), then fetched once more to check the bytes.
nar_url=$url/bench/nar/00000000000000000000000000000000.nar
t=$(curl -sf -o /dev/null -w '%{time_total}' -H "$auth" "$nar_url")
echo "NAR download (zstd frames):      $(rate "$t")"
curl -sf -H "$auth" "$nar_url" | zstd -dqc | cmp - "$work/a.nar"

sha=$(sha256sum "$work/a.nar" | cut -d' ' -f1)
t=$(curl -sf -o /dev/null -w '%{time_total}' -X PUT -H "$auth" --data-binary "@$work/a.nar" "$url/bench/cas/$sha")
echo "Bazel HTTP CAS PUT, same bytes:  $(rate "$t")"
t=$(curl -sf -o /dev/null -w '%{time_total}' -H "$auth" "$url/bench/cas/$sha")
echo "Bazel HTTP CAS GET (decompress): $(rate "$t")"
curl -sf -H "$auth" "$url/bench/cas/$sha" | cmp - "$work/a.nar"
echo "server peak RSS: $(awk '/VmHWM/ { printf "%d MiB", $2 / 1024 }' "/proc/$server/status")"
