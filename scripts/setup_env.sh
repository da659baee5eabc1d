#!/usr/bin/env bash
# Creates ./.venv with everything fastsat needs and builds its C++ (and, where possible, CUDA)
# kernels. Idempotent; `make` calls it when pyproject.toml, setup.py or csrc/ change.
#
# torch: a torch that the base interpreter already has (e.g. a CUDA build on a GPU machine) is
# reused through --system-site-packages. Otherwise torch==2.13.0 is installed; it is pinned
# because an unpinned `pip install torch` resolves to the newest CUDA build (several GB) even on
# a machine without a GPU, while 2.13.0 is the version this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    if "$python" -c "import torch" 2>/dev/null; then
        echo "setup: reusing the torch of $python ($("$python" -c 'import torch; print(torch.__version__)'))"
        "$python" -m venv --system-site-packages .venv
    else
        "$python" -m venv .venv
    fi
fi
venv_python=.venv/bin/python
"$venv_python" -m pip install --quiet --upgrade pip "setuptools>=64" wheel "pybind11>=2.11"
if ! "$venv_python" -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0"
    "$venv_python" -m pip install --quiet "torch==2.13.0"
fi
# --no-build-isolation: setup.py compiles fastsat._C against the torch installed above.
"$venv_python" -m pip install --quiet --no-build-isolation -e ".[test]"
# The timm:NAME route is tested here too. timm needs torchvision, and the registry's only torchvision
# for torch 2.13 is 0.28.0, a CUDA build whose C ops cannot load beside the CPU torch
# (tests/conftest.py lets its Python parts import). --no-deps: neither may pull a CUDA torch.
if "$venv_python" -c "import sys, torch; sys.exit(torch.__version__ != '2.13.0+cpu')" \
        && ! "$venv_python" -m pip show -q timm >/dev/null 2>&1; then
    echo "setup: installing timm and torchvision 0.28.0 (its Python parts) for the timm tests"
    "$venv_python" -m pip install --quiet --no-deps "timm==1.0.31" "torchvision==0.28.0"
    "$venv_python" -m pip install --quiet "huggingface_hub" "safetensors"
fi
"$venv_python" -c "import fastsat.ops as ops; print('setup: fastsat backends', ops.available_backends())"
