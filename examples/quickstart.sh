#!/usr/bin/env bash
# The main job from the shell: features -> head -> predictions for the bundled photos, offline, into one folder.
# Usage: bash examples/quickstart.sh [OUTPUT_FOLDER] [EXAMPLES]
#   OUTPUT_FOLDER default featx-out/quickstart; EXAMPLES: a folder holding ants_bees/ and new_images/ (default: this one)
set -euo pipefail
here="${2:-$(cd "$(dirname "$0")" && pwd)}"
out="${1:-featx-out/quickstart}"

featx extract "$here/ants_bees" -o "$out/features.npz"          # labelled photos (48 bundled), train/ + val/
featx fit "$out/features.npz" --head logistic -o "$out/head.skops"   # C chosen by CV on train, scored on val
featx predict "$here/new_images" --model "$out/head.skops" -o "$out/predictions.csv"
echo "predictions: $out/predictions.csv"
