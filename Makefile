# femurgen: `make demo` runs the whole pipeline on real radiographs, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

SHARED_DATA := ../shared/data/radiographs
# Demo input: FracAtlas beside the checkout when present, else the CR radiographs of pydicom-data.
DATA ?= $(if $(wildcard $(SHARED_DATA)/fracatlas/labels.csv),$(SHARED_DATA)/fracatlas,)
LABELS ?= $(if $(DATA),$(if $(wildcard $(DATA)/labels.csv),$(DATA)/labels.csv,),)
WORK ?= work/demo
WORKERS ?= 2
SEED ?= 0

.PHONY: install demo test test-slow clean-demo

install: $(VENV)/.femurgen-installed

# Installs the pinned torch only when the environment has none, so a GPU user keeps theirs.
$(VENV)/.femurgen-installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if $(PY) -c "import torch" 2>/dev/null; then \
		$(PY) -m pip install -q -e ".[test,demo]"; \
	else \
		$(PY) -m pip install -q $(TORCH_PIN) -e ".[test,demo]"; \
	fi
	touch $@

demo: install
	@set -e; \
	data="$(DATA)"; labels="$(LABELS)"; \
	if [ -z "$$data" ]; then \
		data=$$($(PY) -c "from pydicom.data import get_testdata_file as f; print(' '.join(f(n, download=False) for n in ('RG1_UNCR.dcm', 'RG3_UNCR.dcm')))"); \
		echo "FracAtlas not found beside the checkout; using pydicom-data radiographs: $$data"; \
		export FEMURGEN_SALT="$${FEMURGEN_SALT:-femurgen-demo}"; \
	fi; \
	label_option=""; if [ -n "$$labels" ]; then label_option="--labels $$labels"; fi; \
	$(PY) cli.py pyramid build $$data $$label_option --out $(WORK)/store.zarr --workers $(WORKERS); \
	$(PY) cli.py pyramid info $(WORK)/store.zarr; \
	$(PY) cli.py train-global --store $(WORK)/store.zarr --out $(WORK)/global --config cpu-tiny; \
	$(PY) cli.py train-patch --store $(WORK)/store.zarr --out $(WORK)/patch --config cpu-tiny; \
	$(PY) cli.py synthesize --global $(WORK)/global --patch $(WORK)/patch --out $(WORK)/synthetic \
		--n 2 --size native --min-megapixels 1 --seed $(SEED) --config cpu-tiny; \
	$(PY) cli.py eval --real $(WORK)/store.zarr --synthetic $(WORK)/synthetic --out $(WORK)/eval \
		--config cpu-tiny; \
	echo "synthetic images: $(WORK)/synthetic"; \
	echo "report:           $(WORK)/eval/report.html"

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean-demo:
	rm -rf $(WORK)
