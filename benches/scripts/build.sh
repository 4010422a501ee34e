# The binaries the benchmark scripts run; sourced by bench.sh and flat.sh
# from the repository root. Sets $bin (GARRET_BIN if given, e.g. an older
# commit's server for a before/after in one run of the machine, else this
# tree's release `garret`) and $bench (the release garret-bench: the client
# must not be the bottleneck).
target=${CARGO_TARGET_DIR:-target}
if [ -n "${GARRET_BIN:-}" ]; then
  bin=$GARRET_BIN
else
  cargo build --release -q -p garret-server --bin garret
  bin=$target/release/garret
fi
cargo build --release -q -p garret-benches --bin garret-bench
bench=$target/release/garret-bench
