# Starting and stopping `garret serve` for the benchmark scripts; sourced by
# bench.sh, hostile.sh and flat.sh. Expects $bin, the server binary. Sets
# $work (a temporary directory, removed at exit with the server stopped),
# $server (the running server's pid), $listen (its address, kept for a
# restart) and, after the first start, $admin (the admin token the server
# prints once, on its first start; the token secret stays in the data dir,
# so the token stays valid across restarts). Start number N logs to
# $work/out.N and $work/log.N; $starts is the latest N.
#
# BACKEND picks what the server stores into, and $backend_text says it:
#   embedded     (default) SQLite and the local disk, in $work
#   postgres-s3  a throwaway Postgres 15 cluster (Debian's postgresql-15;
#                Unix socket only, default durability settings, run as the
#                user `postgres` when we are root) and garret-s3, the tests'
#                S3 server (s3s-fs over $work/s3) as a process; both are
#                started before the first start, kept across restarts, and
#                stopped at exit. s3s-fs serves each object from a file
#                through the blocking pool: slow on small GETs, so its
#                latencies are not an S3 service's.
work=$(mktemp -d)
server=""
starts=0
listen=127.0.0.1:0
backend=${BACKEND:-embedded}
backend_env=()
pg_dir=""
s3=""
pg_bin=/usr/lib/postgresql/15/bin

# Runs a Postgres program as `postgres` (it refuses to run as root).
as_pg() {
  if [ "$(id -u)" = 0 ]; then
    setpriv --reuid=postgres --regid=postgres --init-groups "$@"
  else
    "$@"
  fi
}

cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null
  [ -n "$s3" ] && kill "$s3" 2>/dev/null
  [ -n "$pg_dir" ] && as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1
  [ -n "$pg_dir" ] && rm -rf "$pg_dir"
  rm -rf "$work"
}
trap cleanup EXIT

case $backend in
  embedded) backend_text="SQLite + local disk in $work" ;;
  postgres-s3) backend_text="Postgres 15 + S3 (s3s-fs) in $work" ;;
  *) echo "BACKEND=$backend: expected embedded or postgres-s3" >&2; exit 64 ;;
esac

# Starts Postgres and garret-s3 and fills $backend_env; exits 2 with their
# log if one fails.
start_postgres_s3() {
  cargo build --release -q -p garret-benches --bin garret-s3
  local s3_bin=${CARGO_TARGET_DIR:-target}/release/garret-s3
  [ -x "$pg_bin/initdb" ] || { echo "no $pg_bin/initdb: apt-get install postgresql-15" >&2; exit 2; }
  # Outside $work (private to root): the user postgres must reach it.
  pg_dir=$(mktemp -d /tmp/garret-bench-pg.XXXXXX)
  [ "$(id -u)" = 0 ] && chown postgres: "$pg_dir"
  as_pg "$pg_bin/initdb" --pgdata "$pg_dir/data" --username=postgres --auth=trust \
    --encoding=UTF8 --no-locale --no-instructions >"$pg_dir/initdb.log" 2>&1 ||
    { cat "$pg_dir/initdb.log"; exit 2; }
  # -w waits (up to pg_ctl's 60 s) until it accepts connections.
  as_pg "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/postgres.log" -w \
    -o "-k $pg_dir -p 5432 -c listen_addresses= -c max_connections=200" start >/dev/null ||
    { cat "$pg_dir/postgres.log"; exit 2; }
  as_pg "$pg_bin/createdb" -h "$pg_dir" -p 5432 -U postgres garret
  # Started directly (not from a subshell), so it sees this shell as its
  # parent and exits with it, whatever ends the script.
  "$s3_bin" "$work/s3" garret >"$work/s3.env" 2>"$work/s3.log" &
  s3=$!
  until grep -qs '^AWS_SECRET_ACCESS_KEY=' "$work/s3.env"; do
    kill -0 "$s3" 2>/dev/null || { cat "$work/s3.log"; exit 2; }
    sleep 0.1
  done
  mapfile -t backend_env <"$work/s3.env"
  backend_env+=("GARRET_DATABASE_URL=postgres://postgres@localhost:5432/garret?host=$pg_dir")
}

# Running, as opposed to gone or a zombie (an orphan nobody has reaped).
alive() { [ -r "/proc/$server/status" ] && ! grep -qE '^State:[[:space:]]+[ZX]' "/proc/$server/status"; }

# Starts the server on a fresh data dir (the same one on a restart) and waits
# until it listens; exits 2 with its log if it dies first.
start_server() {
  starts=$((starts + 1))
  [ "$backend" = postgres-s3 ] && [ -z "$s3" ] && start_postgres_s3
  # Started from a subshell, so a crash is not reported as a job of the
  # script (in the middle of its output); the log says why it died.
  (
    env "${backend_env[@]}" GARRET_DATA_DIR="$work/data" GARRET_LISTEN="$listen" NO_COLOR=1 \
      "$bin" serve >"$work/out.$starts" 2>"$work/log.$starts" &
    echo $! >"$work/pid"
  )
  server=$(cat "$work/pid")
  until grep -qs "address=" "$work/log.$starts"; do
    alive || { cat "$work/log.$starts"; exit 2; }
    sleep 0.1
  done
  listen=$(grep -o 'address=[^ ]*' "$work/log.$starts" | head -1 | cut -d= -f2)
  [ "$starts" = 1 ] && admin=$(grep '^ey' "$work/out.1")
  return 0
}

stop_server() {
  kill "$server" 2>/dev/null || true
  for _ in $(seq 100); do alive || break; sleep 0.1; done
  kill -9 "$server" 2>/dev/null || true
}
