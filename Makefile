# The two commands of the README. Both set up what they need and can be re-run.
.PHONY: setup demo test test-unit bench bench-collectives bench-kv train-ddp clean

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

# torch: the Python API and torch backend tests (a local wheel on this machine kind).
test: setup
	@.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
	@$(PY) -m pytest -v tests

# The pure-logic tests only: seconds, no root (the venv must exist: make setup once, as root).
test-unit:
	@test -x $(PY) || { echo "test-unit: no .venv: run make setup (as root) once" >&2; exit 1; }
	@$(PY) -m pytest -q -m unit tests

# The benchmark suite against Gloo (needs torch: a local wheel on this machine kind).
bench: setup
	@.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
	@$(PY) scripts/bench.py

# Allreduce, broadcast, allgather, reduce_scatter through the switch against Gloo's.
bench-collectives: setup
	@.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
	@$(PY) scripts/collectives_bench.py

# Word count through the switch vs switch aggregation off vs PySpark (installed on demand).
bench-kv: setup
	@.venv/bin/python -c 'import pyspark' 2>/dev/null || .venv/bin/pip install -q pyspark==3.5.6
	@$(PY) scripts/kv_bench.py

# DDP training with backend "inc" against Gloo: digits accuracy and a throughput run
# (torch and scikit-learn installed on demand).
train-ddp: setup
	@.venv/bin/python -c 'import torch, sklearn' 2>/dev/null || .venv/bin/pip install -q torch==2.13.0 scikit-learn
	@$(PY) scripts/train_ddp.py

# Leftovers of an interrupted demo or benchmark (normally they clean up themselves).
# The labs of demo.sh, throughput.py, kv_bench.py, bench.py (one per regime),
# edf_live.py and faults.py (one per fault); each script's incd is <lab>-incd,
# but edf_live.py's are named for their policy.
LABS := incdemo incbench inckv incb0 incb1 incedf $(addprefix incflt,0 1 2 3 4 5 6 7 8)
INCDS := $(addsuffix -incd,$(LABS)) incedf-edf incedf-fifo
clean:
	-for i in $(INCDS); do .venv/bin/incd --instance $$i stop; done
	-for n in $(LABS); do .venv/bin/inc-lab --name $$n down; done
