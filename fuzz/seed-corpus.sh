#!/usr/bin/env bash
# Seed the reader target's corpus with the reference images (and the
# bundled sample), so that mutations start from real metadata.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=${1:-$here/../../shared/corpus/images}
mkdir -p "$here/corpus/reader"
cp "$here/../sample/sample.erofs" "$here/corpus/reader/"
for f in "$src"/*.erofs; do cp "$f" "$here/corpus/reader/"; done
echo "seeded $(ls "$here/corpus/reader" | wc -l) images into fuzz/corpus/reader"
