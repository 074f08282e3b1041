#!/usr/bin/env bash
# One-time (and idempotent) set-up: .venv with torch first, then brcd-dist with its dev and docs extras,
# and Fashion-MNIST from Debian. A second run on a ready machine only checks and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"

# torch and torchvision first, from the pinned wheels (a bare `torch` would pull a different build).
if ! "$PY" -c "import torch, torchvision, sys; sys.exit(0 if (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0]) == ('2.14.1', '0.29.1') else 1)" 2>/dev/null; then
  echo "[setup] installing $TORCH_PINS (about 90 s)"
  "$PY" -m pip install -q --disable-pip-version-check $TORCH_PINS
fi

# The project and its dev and docs extras; skipped when pyproject.toml has not changed since the last install.
STAMP="$VENV/.brcd-dist-installed"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing brcd-dist[dev,docs] and its dependencies (about 100 s on a fresh venv)"
  "$PY" -m pip install -q --disable-pip-version-check -e ".[dev,docs]"
  echo "$WANT" > "$STAMP"
fi
