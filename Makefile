# The two commands README.md promises, plus the pieces they are made of.
#   make demo   install everything, start Dovecot/Postfix demo backends and mailgress standalone
#   make test   install everything the tests need and run the whole suite
#   make bench  the benchmark against nginx and a direct connection (docs/benchmarks.md);
#               BENCH_ARGS=--quick for a run of a few minutes
#   make render re-render deploy/ and the chart README's values table from charts/mailgress
VENV ?= .venv
PYTHON ?= python3

.PHONY: demo test render bench system-packages venv

system-packages:
	bash testbed/install-system-packages.sh

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: system-packages venv
	$(VENV)/bin/python -m testbed.demo

test: system-packages venv
	$(VENV)/bin/pytest

render: venv
	$(VENV)/bin/python -m deploy.render

$(VENV)/.bench-installed: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	touch $@

bench: system-packages $(VENV)/.bench-installed
	$(VENV)/bin/python -m bench $(BENCH_ARGS)
