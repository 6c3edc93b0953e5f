# Sourced by align.sh and test.sh: OpenBLAS on Linux (MLX's own CPU BLAS is ~50x slower), a
# .venv in the checkout with pip up to date, activated. macOS: Metal, nothing else to install.
if [ "$(uname -s)" = "Linux" ] && [ ! -e /usr/lib/x86_64-linux-gnu/libopenblas.so.0 ] \
    && [ ! -e /usr/lib/aarch64-linux-gnu/libopenblas.so.0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
fi
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
