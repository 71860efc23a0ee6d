# The two commands of the README. Both set up what they need and can be re-run.
.PHONY: setup demo test clean

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(PY) -m pytest -v tests

clean:
	-.venv/bin/incd --instance incbench-incd stop
	-.venv/bin/inc-lab --name incbench down
