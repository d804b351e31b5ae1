# geopipe — two set-up commands: `make demo` (end to end on the offline demo world) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.geopipe-installed

.PHONY: demo test bench gpu-check bench-geoclip clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geopipe demo --workdir data/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/geopipe bench

# One prepared run on a CUDA machine (<= 8 min): every CUDA path against its bare baseline and the
# CPU path; writes bench-data/gpu-check.json and .txt; exit 1 when a check raised or disagreed.
gpu-check: $(STAMP)
	$(BIN)/geopipe bench --what gpu --device cuda --workdir bench-data -o bench-data/gpu-check.json

# the realistic geoclip world (pip install --no-deps geoclip) and one table of every method on it (README)
bench-geoclip: $(STAMP)
	$(BIN)/geopipe demo-data data/geoclip --world geoclip
	$(BIN)/python -c "from geopipe.stages.bench_geoclip import GeoclipBenchConfig as C, run_geoclip_bench as run; print(run(C('data/geoclip')).table)"

clean-demo:
	rm -rf data/demo
