#!/usr/bin/env bash
# Create .venv (once) and install spartha-pyro with its test and notebook tools.
# torch/torchvision are pinned to the builds this environment serves from local disk.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test,notebooks]"
