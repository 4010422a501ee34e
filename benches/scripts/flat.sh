#!/usr/bin/env bash
# Reads from garret against the read limit of this machine: nginx serving
# the same store paths as a flat `nix copy --to file://…?compression=zstd`
# cache (issue 12). Both are measured by garret-bench in one run, with
# nothing but HTTP/1.1 GETs of the same paths:
#   benches/scripts/flat.sh
#   RUNS=5 benches/scripts/flat.sh
#   BACKEND=postgres-s3 benches/scripts/flat.sh
# Steps:
#   1. A path set of about 300 store paths (1 GiB of NAR, about 3/4 of the
#      paths under 1 MiB, a few tens of MiB; files of real binaries and
#      text from /usr, each made unique, and random bytes), added with
#      Debian's Nix to a store under $FLAT_DIR/root (`local?root=`), and
#      `nix copy`'d, signed, into the file cache $FLAT_DIR/flat with zstd.
#      Kept between runs: made only if $FLAT_DIR/ready is missing.
#   2. nginx (Debian's nginx-light, installed if missing) serves
#      $FLAT_DIR/flat at a free 127.0.0.1 port: sendfile, keep-alive and
#      worker_processes auto, as Debian's nginx.conf has them; its config,
#      logs and pid are in a temporary prefix; run in the foreground
#      (daemon off) and stopped at exit.
#   3. A fresh release `garret serve` (server.sh; BACKEND as there) gets a
#      public cache `flat` through the Attic API, and `nix copy --to
#      'http://…/flat?compression=none'` pushes the same paths into it, with
#      the admin token in a netrc.
#   4. garret-bench --substituter garret:PID=http://…/flat \
#          --substituter nginx:PIDS=http://127.0.0.1:PORT \
#          --path-set $FLAT_DIR/paths --runs $RUNS path-set-narinfo path-set-nar
#      fetches every narinfo over one keep-alive connection, then every NAR
#      file over 1, 4 and 16 connections, from each server in turn, and
#      prints its table and the ratios of garret's times to nginx's. No
#      token is sent to either: both caches are public.
#   5. With PERF=FILE, then profiles garret (`perf record -F 999 -g`) over
#      PERF_RUNS (50) more runs of PERF_SCENARIO (path-set-narinfo) against
#      it alone, and writes the flat profile (`perf report --no-children`)
#      to FILE.
# Environment: RUNS (5), FLAT_DIR (/var/tmp/garret-flat), BACKEND, JSON (a
# file for garret-bench's --json), GARRET_BIN (as in bench.sh), PERF.
# Exit status: garret-bench's (1 if a scenario failed), 2 if a server died.
set -euo pipefail
cd "$(dirname "$0")/../.."
flat=${FLAT_DIR:-/var/tmp/garret-flat}
. benches/scripts/build.sh

# What the script drives, installed when missing (as tests/run does).
packages=()
command -v nix-store >/dev/null || packages+=(nix-bin)
[ -x /usr/sbin/nginx ] || packages+=(nginx-light)
command -v python3 >/dev/null || packages+=(python3)
if ((${#packages[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "flat.sh: installing ${packages[*]}" >&2
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${packages[@]}" >&2
fi

# Nix of its own: configuration, state and store under $flat, so the host's
# /nix is never touched and no daemon is needed. Only for Nix: with HOME
# moved, cargo (server.sh builds garret-s3) would not find its toolchain.
nix_conf=$flat/nix/conf
with_nix() {
  env NIX_CONF_DIR="$nix_conf" NIX_STATE_DIR="$flat/nix/state" NIX_LOG_DIR="$flat/nix/log" \
    XDG_CACHE_HOME="$flat/nix/cache" HOME="$flat/nix" "$@"
}
store="local?root=$flat/root"

# The path set: generated trees, added to the store, copied to the file
# cache. Sizes and contents come from a fixed seed; the real files they
# quote are this machine's.
make_path_set() {
  # Store paths are read-only; only what this function makes is removed.
  chmod -R u+w "$flat/root" 2>/dev/null || true
  rm -rf "$flat/root" "$flat/flat" "$flat/src" "$flat/nix" "$flat/paths" "$flat"/key.*
  mkdir -p "$nix_conf" "$flat/src"
  printf 'experimental-features = nix-command\nbuild-users-group =\nsandbox = false\nsubstituters =\n' \
    >"$nix_conf/nix.conf"
  python3 - "$flat/src" <<'EOF'
import os, random, sys

out = sys.argv[1]
rng = random.Random(12)
MIB = 1 << 20

# Real bytes to quote: shared libraries, executables and text from /usr
# (already-compressed files left out), about 128 MiB.
corpus = bytearray()
skip = (".gz", ".xz", ".zst", ".bz2", ".png", ".jpg", ".zip", ".jar")
for top in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/share/doc", "/usr/share/perl"):
    for dirpath, dirs, files in sorted(os.walk(top)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            if name.endswith(skip) or os.path.islink(path) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    corpus += f.read(8 * MIB)
            except OSError:
                continue
            if len(corpus) >= 128 * MIB:
                break
        if len(corpus) >= 128 * MIB:
            break
    if len(corpus) >= 128 * MIB:
        break

def quoted(size):
    """A slice of the corpus, one byte in every 4 KiB replaced, so no two
    files (nor their 64 KiB chunks) are the same: the content compresses
    like build outputs without deduplicating."""
    start = rng.randrange(0, len(corpus) - size) if len(corpus) > size else 0
    data = bytearray(corpus[start:start + size])
    while len(data) < size:
        data += corpus[: size - len(data)]
    for i in range(0, size, 4096):
        data[i] = rng.randrange(256)
    return bytes(data)

def content(size):
    return quoted(size) if rng.random() < 0.7 else rng.randbytes(size)

def log_uniform(lo, hi):
    return int(lo * (hi / lo) ** rng.random())

# 225 paths under 1 MiB, 60 of 1 to 12 MiB, 15 large ones scaled so the
# whole set is about 1 GiB.
sizes = [log_uniform(2048, MIB - 4096) for _ in range(225)]
sizes += [log_uniform(MIB, 12 * MIB) for _ in range(60)]
large = [log_uniform(12 * MIB, 80 * MIB) for _ in range(15)]
scale = max(1.0, (1024 * MIB - sum(sizes)) / sum(large))
sizes += [int(s * scale) for s in large]
order = list(range(len(sizes)))
rng.shuffle(order)

for n, i in enumerate(order):
    total = sizes[i]
    root = os.path.join(out, f"{n:03d}-bench-path")
    files = rng.randint(1, 6)
    for k in range(files):
        # The first file takes most of a large path, as a library does.
        size = total // files if total < MIB else (total * 9 // 10 if k == 0 else total // 10 // max(1, files - 1))
        sub = ("lib", "bin", "share/doc")[k % 3]
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        path = os.path.join(root, sub, f"file{k}")
        with open(path, "wb") as f:
            f.write(content(max(1, size)))
        if sub == "bin":
            os.chmod(path, 0o755)
EOF
  with_nix nix-store --store "$store" --add "$flat"/src/* >"$flat/paths"
  rm -rf "$flat/src"
  with_nix nix-store --generate-binary-cache-key garret-flat-1 "$flat/key.sec" "$flat/key.pub"
  # shellcheck disable=SC2046 # one argument per store path
  with_nix nix copy --from "$store" --to "file://$flat/flat?compression=zstd&secret-key=$flat/key.sec" \
    $(cat "$flat/paths")
  touch "$flat/ready"
}
[ -e "$flat/ready" ] || make_path_set
read -r count nar_mib small < <(
  # shellcheck disable=SC2046
  with_nix nix path-info --store "$store" --json $(cat "$flat/paths") |
    python3 -c 'import json, sys
infos = json.load(sys.stdin)
sizes = [i["narSize"] for i in infos]
print(len(sizes), sum(sizes) >> 20, sum(s < 1 << 20 for s in sizes))'
)
wire_mib=$(du -sm "$flat/flat/nar" | cut -f1)

. benches/scripts/server.sh

# nginx over the file cache, its prefix (config, logs, pid, temp files) in
# $work; as root its workers stay root, so they read $flat as we do.
nginx_dir=$work/nginx
mkdir -p "$nginx_dir"
nginx_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
user_line=""
[ "$(id -u)" = 0 ] && user_line="user root;"
cat >"$nginx_dir/nginx.conf" <<EOF
$user_line
daemon off;
worker_processes auto;
pid $nginx_dir/nginx.pid;
error_log $nginx_dir/error.log;
events { worker_connections 768; }
http {
  sendfile on;
  tcp_nopush on;
  types_hash_max_size 2048;
  default_type application/octet-stream;
  types { text/x-nix-narinfo narinfo; }
  access_log off;
  client_body_temp_path $nginx_dir/body;
  proxy_temp_path $nginx_dir/proxy;
  server {
    listen 127.0.0.1:$nginx_port;
    root $flat/flat;
  }
}
EOF
/usr/sbin/nginx -p "$nginx_dir" -c "$nginx_dir/nginx.conf" -e "$nginx_dir/error.log" &
nginx=$!
trap 'kill "$nginx" 2>/dev/null; cleanup' EXIT
until curl -sf -o /dev/null "http://127.0.0.1:$nginx_port/nix-cache-info"; do
  kill -0 "$nginx" 2>/dev/null || { cat "$nginx_dir/error.log"; exit 2; }
  sleep 0.1
done
nginx_workers=$(pgrep -P "$nginx" | paste -sd,)

# garret with a public cache holding the same paths.
start_server
url=http://$listen
curl -sf -o /dev/null -X POST -H "Authorization: Bearer $admin" \
  -d '{"keypair":"Generate","is_public":true,"store_dir":"/nix/store","priority":41,"upstream_cache_key_names":[]}' \
  "$url/_api/v1/cache-config/flat"
printf 'machine 127.0.0.1\nlogin garret\npassword %s\n' "$admin" >"$work/netrc"
started=$(date +%s.%N)
# shellcheck disable=SC2046
with_nix nix copy --option netrc-file "$work/netrc" --from "$store" --to "$url/flat?compression=none" \
  $(cat "$flat/paths") 2>"$work/push.log" || { cat "$work/push.log"; exit 2; }
push_s=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

echo "path set: $count paths, $nar_mib MiB of NAR ($small under 1 MiB), $wire_mib MiB as zstd files; $flat"
echo "garret serve at $url/flat ($backend_text), filled by nix copy in $push_s s; nginx $(/usr/sbin/nginx -v 2>&1 | cut -d/ -f2) at http://127.0.0.1:$nginx_port (workers $nginx_workers)"
echo "${GARRET_BIN:-$(git rev-parse --short HEAD)}; $(date -u +%FT%TZ); $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo

json_args=()
[ -n "${JSON:-}" ] && json_args=(--json "$JSON")
rc=0
"$bench" --pid "$server" --runs "${RUNS:-5}" --path-set "$flat/paths" \
  --substituter "garret:$server=$url/flat" \
  --substituter "nginx:$nginx_workers=http://127.0.0.1:$nginx_port" \
  "${json_args[@]}" path-set-narinfo path-set-nar || rc=$?
if ! alive; then
  echo "- garret died: $(grep -m1 -E 'panicked at|ERROR' "$work/log.1" || echo "no message in its log")"
  rc=2
fi
kill -0 "$nginx" 2>/dev/null || { echo "- nginx died"; rc=2; }
if [ -n "${PERF:-}" ] && [ "$rc" = 0 ]; then
  perf record -F 999 -g -p "$server" -o "$work/perf.data" 2>"$work/perf.log" &
  perf=$!
  "$bench" --runs "${PERF_RUNS:-50}" --path-set "$flat/paths" --substituter "garret:$server=$url/flat" \
    "${PERF_SCENARIO:-path-set-narinfo}" >"$work/perf-run.md"
  kill -INT "$perf"
  wait "$perf" || true
  perf report -i "$work/perf.data" --no-children --stdio --percent-limit 1 \
    --sort dso,symbol -g none 2>/dev/null | grep '%' | cut -c1-120 | sed 's/ *$//' >"$PERF"
  grep ': garret |' "$work/perf-run.md" >>"$PERF"
fi
exit "$rc"
