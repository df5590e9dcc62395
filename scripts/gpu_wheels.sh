#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, fetched here for its Python, into an ignored folder that
# travels with the working tree (the device tool's `carry`). scripts/gpu_check.sh installs them
# there into a scratch folder before it runs.
#   bash scripts/gpu_wheels.sh                         Python 3.12, manylinux x86_64, into .whl/
#   bash scripts/gpu_wheels.sh --python-version 3.11   (a check here: these install beside our venv)
#   bash scripts/gpu_wheels.sh --dest DIR
# The device has torch, numpy, pyyaml, protobuf, requests, sentencepiece, safetensors and
# transformers; these are what the project needs beyond them (versions as our venv resolves).
set -euo pipefail
cd "$(dirname "$0")/.."
version=3.12
dest=.whl
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) version=$2; shift 2 ;;
    --dest) dest=$2; shift 2 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (--python-version X.Y, --dest DIR)" >&2; exit 2 ;;
  esac
done
PACKAGES=(
  webdataset==1.0.2 braceexpand==0.1.7  # shards (data.dataset, data.prepare)
  zstandard==0.25.0                      # .jsonl.zst sources
  torchft==0.2.0                         # fault-tolerant replica groups, and what it imports:
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-exporter-http-transport==0.66b2 opentelemetry-exporter-otlp-common==0.66b2
  opentelemetry-proto==1.45.2 googleapis-common-protos==1.76.0
)
LIMIT_MIB=32  # the device tool carries 64 MiB with the whole working tree
PY=${PYTHON:-python3}
rm -rf "$dest"
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
  --implementation cp "${platforms[@]}" -d "$dest" "${PACKAGES[@]}" 2>&1 \
  | grep -v "^WARNING: Location" || true
count=$(ls "$dest"/*.whl 2>/dev/null | wc -l)
if [ "$count" -ne "${#PACKAGES[@]}" ]; then
  echo "gpu_wheels.sh: got $count wheels for ${#PACKAGES[@]} packages in $dest" >&2
  exit 1
fi
size=$(du -sm "$dest" | cut -f1)
if [ "$size" -gt "$LIMIT_MIB" ]; then
  echo "gpu_wheels.sh: $dest holds $size MiB, over the $LIMIT_MIB MiB this script allows" >&2
  exit 1
fi
echo "wrote $count wheels ($size MiB) for Python $version into $dest"
echo "device tool: carry [\"$dest\"], command: bash scripts/gpu_check.sh"
echo "(gpu_check.sh installs them first: $PY -m pip install -q --no-index --no-deps --target" \
  "/tmp/engram_site $dest/*.whl && export PYTHONPATH=/tmp/engram_site)"
