# Starting and stopping `garret serve` for the benchmark scripts; sourced by
# bench.sh and hostile.sh. Expects $bin, the server binary. Sets $work (a
# temporary directory, removed at exit with the server stopped), $server
# (the running server's pid), $listen (its address, kept for a restart) and,
# after the first start, $admin (the admin token the server prints once, on
# its first start; the token secret stays in the data dir, so the token
# stays valid across restarts). Start number N logs to $work/out.N and
# $work/log.N; $starts is the latest N.
work=$(mktemp -d)
server=""
starts=0
listen=127.0.0.1:0
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# Running, as opposed to gone or a zombie (an orphan nobody has reaped).
alive() { [ -r "/proc/$server/status" ] && ! grep -qE '^State:[[:space:]]+[ZX]' "/proc/$server/status"; }

# Starts the server on a fresh data dir (the same one on a restart) and waits
# until it listens; exits 2 with its log if it dies first.
start_server() {
  starts=$((starts + 1))
  # Started from a subshell, so a crash is not reported as a job of the
  # script (in the middle of its output); the log says why it died.
  (
    GARRET_DATA_DIR=$work/data GARRET_LISTEN=$listen NO_COLOR=1 \
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
