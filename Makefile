# diffdask: two commands on a fresh machine.
#   make demo   set up .venv and run the main job on an embedded LocalCluster
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DIFFDASK := $(VENV)/bin/diffdask
DEMO := demo_out

.PHONY: demo test bench install clean

install: $(VENV)/.installed

# torch==2.13.0 first: that pin takes the local CPU wheel; an open range would pull GBs of CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,viz]"
	touch $@

demo: install
	mkdir -p $(DEMO)
	$(PY) -m diffdask.demo $(DEMO)/run.cxi --n-frames 2000
	$(DIFFDASK) ingest $(DEMO)/run.cxi $(DEMO)/run.zarr --overwrite \
		--per-frame diameter_nm=entry_1/sample_1/diameter_nm --per-frame single_hit=entry_1/sample_1/single_hit \
		--per-frame n_particles=entry_1/sample_1/n_particles --batch-frames 500
	$(DIFFDASK) info $(DEMO)/run.zarr
	$(DIFFDASK) reduce $(DEMO)/run.zarr --overwrite --figure $(DEMO)/reduce.png

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/io_throughput.py

clean:
	rm -rf $(VENV) $(DEMO) bench_out
