#!/bin/sh
# Install torch, at the version pyproject.toml pins, into the environment of PYTHON. TORCH picks the build:
#   cpu (default)    the CPU build from PyTorch's CPU wheel index: a few hundred MB, where PyPI's default Linux
#                    build brings the CUDA stack (nvidia-*, triton: gigabytes). If that index cannot be reached and
#                    no local mirror has the +cpu wheel, it falls back to the default index's torch, and says so.
#   cu126, cu128...  that CUDA build, from PyTorch's index for it (no fallback: you asked for it)
#   pypi             the default index's own build (on PyPI: CUDA on Linux, CPU on macOS and Windows)
# TORCH_INDEX=URL takes the cpu or cuNNN build from another index (a mirror of PyTorch's).
#
# Usage: scripts/install-torch.sh PYTHON [PIP_OPTION...]
#   scripts/install-torch.sh .venv/bin/python
#   TORCH=cu128 scripts/install-torch.sh .venv/bin/python
#   scripts/install-torch.sh .venv/bin/python --dry-run --report torch.json   # shows what would be installed
set -eu

python=${1:?usage: scripts/install-torch.sh PYTHON [PIP_OPTION...]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
# The one pin of torch is the train extra's `torch==X` in pyproject.toml.
version=$("$python" -c 'import re, sys, tomllib
extras = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]
print(next(m[1] for r in extras["train"] if (m := re.fullmatch(r"torch==(\S+)", r))))' "$root/pyproject.toml")

build=${TORCH:-cpu}
if [ "$build" = cpu ] && [ "$(uname -s)" = Darwin ]; then
    build=pypi  # PyPI's macOS wheel is the CPU build; PyTorch's CPU index has no +cpu one for macOS
fi
dry_run=no
for option in "$@"; do [ "$option" = --dry-run ] && dry_run=yes; done

pip() { "$python" -m pip "$@"; }

case $build in
    pypi)
        echo "install-torch: torch==$version from the default index"
        exec "$python" -m pip install "torch==$version" "$@" ;;
    cpu | cu[0-9]*) ;;
    *)
        echo "install-torch: TORCH=$build: expected cpu, a CUDA build such as cu128, or pypi" >&2
        exit 2 ;;
esac

index=${TORCH_INDEX:-https://download.pytorch.org/whl/$build}
wheel="torch==$version+$build"
# The local version label (+cpu, +cu128) is pinned, so no other build can satisfy this step. --no-deps: only the
# torch wheel comes under the short timeout; torch's own requirements follow below with pip's usual patience.
# --extra-index-url (not --index-url) keeps the default index and any configured mirror in play.
echo "install-torch: $wheel from $index (or a local mirror)"
if pip install --no-deps --timeout 10 --retries 1 --extra-index-url "$index" "$wheel" "$@"; then
    [ $dry_run = yes ] && exit 0
    # torch is installed and satisfies the pin: this adds only what torch requires (filelock, sympy, ...)
    exec "$python" -m pip install "torch==$version"
fi
if [ "$build" != cpu ]; then
    echo "install-torch: could not install $wheel from $index" >&2
    exit 1
fi
echo "install-torch: could not get $wheel (is $index reachable?); falling back to torch==$version from" \
     "the default index: on PyPI for Linux that is the CUDA build (gigabytes)" >&2
exec "$python" -m pip install "torch==$version" "$@"
