# Two entry points (see README): `make demo` runs the embedded default end to end, `make test` runs the tests.
# Both create .venv when it is missing (scripts/setup.sh picks CPU or CUDA torch).
PY := .venv/bin/python

.PHONY: setup demo test bench clean
setup: .venv/.ready
.venv/.ready: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) -m wsra_dist.cli demo --out runs/demo

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_phi.py && $(PY) bench/bench_shards.py && $(PY) bench/bench_train.py && $(PY) bench/bench_features.py

clean:
	rm -rf .venv runs results
