#!/usr/bin/env bash
# One call on the GPU host: train the demo model, then pack it for the trip back (only files under $OUT return,
# each at most 16 MiB): the folder as a tar in 15 MiB parts, plus loss.png, training_log.json and the console log.
# Needs the corpus in .carry/pydoc (`make corpus`). Extra arguments go to `moeflow train-demo`.
# Reassemble with scripts/unpack_demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder to write into}
PYTHONPATH=src python3 -m moeflow train-demo --corpus .carry/pydoc --out "$OUT/model" --device cuda "$@" \
    2>&1 | tee "$OUT/train.log"
for f in training_log.json loss.png; do [ -f "$OUT/model/$f" ] && cp "$OUT/model/$f" "$OUT/"; done
tar -C "$OUT" -cf - model | split -b 15m - "$OUT/model.tar.part-"
rm -rf "$OUT/model"
ls -l "$OUT"
