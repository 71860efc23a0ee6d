#!/usr/bin/env bash
# The main job: a 4-worker lab, incd on the switch, an allreduce throughput run
# over a few sizes with every result verified, a table, and a clean teardown
# (throughput.py removes the lab and stops incd even when something fails).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/throughput.py --workers 4 --sizes 1KiB,64KiB,1MiB,16MiB --iters 5 \
  --datapath auto --lab-name incdemo --out results/demo.json "$@"
