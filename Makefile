# The two commands of the README. Both set up what they need and can be re-run.
.PHONY: setup demo test bench bench-kv clean

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(PY) -m pytest -v tests

# The benchmark suite against Gloo (needs torch: a local wheel on this machine kind).
bench: setup
	@.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
	@$(PY) scripts/bench.py

# Word count through the switch vs switch aggregation off vs PySpark (installed on demand).
bench-kv: setup
	@.venv/bin/python -c 'import pyspark' 2>/dev/null || .venv/bin/pip install -q pyspark==3.5.6
	@$(PY) scripts/kv_bench.py

# Leftovers of an interrupted demo or benchmark (normally they clean up themselves).
clean:
	-for n in incdemo incbench inckv incb0 incb1 incedf incflt0 incflt1 incflt2 incflt3 incflt4 incflt5 incflt6 incflt7; do .venv/bin/incd --instance $$n-incd stop; .venv/bin/inc-lab --name $$n down; done
