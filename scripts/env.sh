# Sourced by the scripts: one shared target dir outside the clone, so RocksDB's C++ build is
# paid once per machine, not once per clone.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/junction-target}"
export CARGO_INCREMENTAL=0
