# Thin wrapper: every stage target runs the same `cellmap-repro` command, natively in
# .venv (RUNNER=local) or in the pinned container (RUNNER=docker). No behaviour lives here.

EXP ?= setup_04_all
ARGS ?=
# training processes (one per GPU) through torchrun; unset or 1: one process
GPUS ?=
PYTHON ?= python3
VENV ?= .venv
DOCKER ?= docker
IMAGE ?= cellmap-repro:latest
# docker when a Docker engine answers, else local
RUNNER ?= $(shell $(DOCKER) info >/dev/null 2>&1 && echo docker || echo local)

ifeq ($(RUNNER),docker)
# $(call cli,<compose service>) runs the CLI in that service's container
cli = docker compose run --rm $(1)
# built on first use (with your UID/GID); the mounted folders must exist before Docker
# would create them as root
STAGE_DEPS := image-if-missing
# the image's ID goes into every run manifest
export CELLMAP_REPRO_IMAGE_DIGEST = $(shell $(DOCKER) image inspect --format '{{.Id}}' $(IMAGE) 2>/dev/null)
else ifeq ($(RUNNER),local)
cli = $(VENV)/bin/cellmap-repro
STAGE_DEPS := $(VENV)/.installed
else
$(error RUNNER must be local or docker, not '$(RUNNER)')
endif

.DEFAULT_GOAL := help
.PHONY: bsub gpu-check image image-if-missing lint lock help install sbatch smoke tiny-crop download weights datasplit train predict process evaluate pack view verify tensorboard unite-logs test

help: ## list the targets
	@echo "cellmap-repro (RUNNER=$(RUNNER), EXP=$(EXP)); pass extra flags with ARGS='...'"
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	# requirements-dev.txt is requirements.txt plus the test tools, same versions
	$(VENV)/bin/python -m pip install --quiet --require-hashes --no-deps -r requirements-dev.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed ## create .venv with the locked dependencies (native runs)

smoke: $(STAGE_DEPS) ## main job: tiny crop -> train -> predict -> process (-> evaluate), prints where outputs are
	$(call cli,train) smoke $(ARGS)

tiny-crop: $(STAGE_DEPS) ## write the tiny synthetic crop, synthetic weights and the datasplit
	$(call cli,train) tiny-crop -e $(EXP) $(ARGS)

download: $(STAGE_DEPS) ## fetch CellMap crops from the public S3 bucket into data/
	$(call cli,download) fetch $(ARGS)

weights: $(STAGE_DEPS) ## download the real setup04 weights into data/weights
	$(call cli,download) weights $(ARGS)

datasplit: $(STAGE_DEPS) ## write EXP's datasplit.csv from the crops in data/
	$(call cli,train) datasplit -e $(EXP) $(ARGS)

train: $(STAGE_DEPS) ## train EXP (ARGS='--resume' to continue; GPUS=N: N processes, one per GPU, through torchrun)
	$(call cli,train) train -e $(EXP) $(if $(filter-out 1,$(GPUS)),--nproc $(GPUS)) $(ARGS)

predict: $(STAGE_DEPS) ## predict EXP's validation crops
	$(call cli,predict) predict -e $(EXP) $(ARGS)

process: $(STAGE_DEPS) ## threshold / label EXP's predictions
	$(call cli,process) process -e $(EXP) $(ARGS)

evaluate: $(STAGE_DEPS) ## score EXP's processed predictions on its validation crops
	$(call cli,evaluate) evaluate -e $(EXP) $(ARGS)

pack: $(STAGE_DEPS) ## write a submission zip from EXP's processed test crops
	$(call cli,process) pack -e $(EXP) $(ARGS)

# Native only: the viewer binds 127.0.0.1, which a port published from a container would not reach.
CROP ?=
view: $(VENV)/.installed ## neuroglancer on 127.0.0.1 for EXP's crop CROP (raw, truth, predictions, masks); Ctrl-C stops
	@test -n "$(CROP)" || { echo "make view: give the crop, e.g. make view EXP=$(EXP) CROP=234" >&2; exit 2; }
	$(VENV)/bin/cellmap-repro view -e $(EXP) --crop $(CROP) $(ARGS)

verify: $(STAGE_DEPS) ## check bit-for-bit reproducibility of EXP (repeat, kill+resume)
	$(call cli,verify) verify -e $(EXP) $(ARGS)

unite-logs: $(STAGE_DEPS) ## gather all experiments' TensorBoard runs into experiments/.tensorboard
	$(call cli,tensorboard) unite-logs $(ARGS)

tensorboard: $(STAGE_DEPS) ## serve all experiments' TensorBoard runs (http://127.0.0.1:6006)
ifeq ($(RUNNER),docker)
	docker compose up tensorboard
else
	$(call cli,tensorboard) tensorboard $(ARGS)
endif

gpu-check: $(STAGE_DEPS) ## check GPU, driver and CUDA for the image (in the train service's container)
	$(call cli,train) gpu-check

# ---------------------------------------------------------------- clusters (docs/cluster.md)
JOB ?= train
SEEDS ?= 0-4
SBATCH_ARGS ?=
BSUB_ARGS ?=

sbatch: ## submit a Slurm job for EXP: JOB=train (default), smoke, predict, verify, or seeds (SEEDS=0-4, then the report); SBATCH_ARGS='...'
ifeq ($(JOB),seeds)
	jid=$$(EXP=$(EXP) ARGS='$(ARGS)' sbatch --parsable --array=$(SEEDS) $(SBATCH_ARGS) cluster/slurm/seeds.sbatch) \
	  && echo "seeds: job array $$jid" && EXP=$(EXP) sbatch --dependency=afterany:$$jid cluster/slurm/seeds-report.sbatch
else
	EXP=$(EXP) ARGS='$(ARGS)' sbatch $(SBATCH_ARGS) cluster/slurm/$(JOB).sbatch
endif

bsub: ## submit an LSF job for EXP (untested): JOB=train, smoke, predict, verify or seeds; BSUB_ARGS='-q gpu_h100'
	EXP=$(EXP) ARGS='$(ARGS)' bsub $(BSUB_ARGS) < cluster/lsf/$(JOB).bsub

test: $(VENV)/.installed ## run the test suite (natively)
	$(VENV)/bin/python -m pytest $(ARGS)

UV = $(VENV)/bin/uv
LOCK_FLAGS = --quiet --universal --generate-hashes --python-version 3.11 --no-header --custom-compile-command "make lock"

lock: ## regenerate requirements.txt and requirements-dev.txt from pyproject.toml (needs uv and PyPI)
	test -x $(UV) || $(VENV)/bin/python -m pip install --quiet uv
	UV_NATIVE_TLS=1 $(UV) pip compile $(LOCK_FLAGS) pyproject.toml -o requirements.txt
	UV_NATIVE_TLS=1 $(UV) pip compile $(LOCK_FLAGS) --extra test pyproject.toml -o requirements-dev.txt

# ---------------------------------------------------------------- containers
# Empty BASE_IMAGE means the Dockerfile's pinned CUDA base (and its digest label); for
# another base the label records its digest, or its local image ID when it has none.
BASE_IMAGE ?=
BASE_DIGEST = $(if $(findstring @sha256:,$(BASE_IMAGE)),$(lastword $(subst @, ,$(BASE_IMAGE))),$(shell $(DOCKER) image inspect --format '{{.Id}}' $(BASE_IMAGE) 2>/dev/null))
EXTRA_CA ?=
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LOCK_SHA256 := $(shell sha256sum requirements.txt | cut -d' ' -f1)
export UID := $(shell id -u)
export GID := $(shell id -g)
export IMAGE REVISION LOCK_SHA256 EXP GPUS
# GPU reservations only where an NVIDIA driver exists; otherwise the CPU override.
export COMPOSE_FILE ?= $(if $(shell command -v nvidia-smi 2>/dev/null),compose.yaml,compose.yaml:compose.cpu.yaml)
# Compose v2 from the dev tools when the docker CLI has no compose plugin (lint only)
COMPOSE ?= $(if $(wildcard $(VENV)/bin/docker-compose),$(VENV)/bin/docker-compose,docker compose)
comma := ,

image: ## build the container image (BASE_IMAGE=..., EXTRA_CA=ca-bundle.crt behind a TLS proxy)
	DOCKER_BUILDKIT=1 $(DOCKER) build --progress=plain -f docker/Dockerfile -t $(IMAGE) \
	  $(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg BASE_DIGEST=$(BASE_DIGEST) --build-arg APT_SNAPSHOT=) \
	  $(if $(EXTRA_CA),--secret id=extra_ca$(comma)src=$(EXTRA_CA)) \
	  --build-arg UID=$(UID) --build-arg GID=$(GID) \
	  --build-arg REVISION=$(REVISION) --build-arg LOCK_SHA256=$(LOCK_SHA256) .

image-if-missing:
	@$(DOCKER) image inspect $(IMAGE) >/dev/null 2>&1 || $(MAKE) --no-print-directory image
	@mkdir -p data experiments

lint: ## lint the Dockerfile (hadolint) and validate the compose files (schema and compose config)
	$(VENV)/bin/hadolint docker/Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml
	$(COMPOSE) config -q
