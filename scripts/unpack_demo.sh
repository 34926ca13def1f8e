#!/usr/bin/env bash
# Reassemble the demo model from the tar parts that scripts/train_demo_gpu.sh wrote:
#   scripts/unpack_demo.sh DIR_WITH_PARTS [DEST (default: src/moeflow/data/pydoc-moe)]
set -euo pipefail
SRC=${1:?usage: unpack_demo.sh DIR_WITH_PARTS [DEST]}
DEST=${2:-$(dirname "$0")/../src/moeflow/data/pydoc-moe}
TMP=$(mktemp -d)
cat "$SRC"/model.tar.part-* | tar -xf - -C "$TMP"
mkdir -p "$(dirname "$DEST")"
rm -rf "$DEST"
mv "$TMP/model" "$DEST"
rmdir "$TMP"
chmod 644 "$DEST"/*
ls -l "$DEST"
