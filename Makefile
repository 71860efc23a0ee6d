# The two commands of the README. Both set up what they need and can be re-run.
.PHONY: setup demo test clean

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(PY) -m pytest -v tests

# Leftovers of an interrupted demo or benchmark (normally they clean up themselves).
clean:
	-for n in incdemo incbench; do .venv/bin/incd --instance $$n-incd stop; .venv/bin/inc-lab --name $$n down; done
