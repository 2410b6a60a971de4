# All set-up lives here: `make test` and `make quickstart` create .venv and install into it
# (idempotent: the install step reruns only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup detect-extra test test-fast quickstart lint bench bench-gpu ablation real-study clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The optional CNN face detector (clerf predict --detector blazeface): MediaPipe 0.10.21, the last
# release whose wheel ships the BlazeFace models. --no-deps: its declared dependencies would pull
# opencv-contrib-python (replacing clerf's headless cv2), numpy < 2 and protobuf < 5; the
# detector needs only these companions (tested with numpy 2, protobuf 7, opencv-headless 4.14).
DETECT_STAMP := $(VENV)/.detect-extra
$(DETECT_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps "mediapipe==0.10.21" "absl-py>=2" "attrs>=23"
	touch $(DETECT_STAMP)

detect-extra: $(DETECT_STAMP)

test: $(STAMP) $(DETECT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# the tests not marked slow (minutes, not twenty): for the edit-test loop; CI runs `make test`
test-fast: $(STAMP) $(DETECT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow"

quickstart: $(STAMP)
	$(BIN)/clerf pipeline configs/quickstart.yaml --out runs/quickstart

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py --json runs/bench.json

# the GPU check (about 4 minutes on one GPU; says it needs one and exits 0 elsewhere)
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

ablation: $(STAMP)
	$(BIN)/clerf finetune configs/ablation/d_supervised_pretrain.yaml --out runs/ablation/d_pretrain finetune.train.progress=false
	for v in a_hopenet b_6d_geometric c_clerf d_supervised; do \
		$(BIN)/clerf pipeline configs/ablation/$$v.yaml --out runs/ablation/$$v --no-progress || exit 1; \
	done

# CLERF's claims on real faces (docs/real_faces.md): resumable, skips every finished step.
#   make real-study P04=/data/Prima AFLW=/data/AFLW2000     (SEEDS=0 for one seed)
SEEDS ?= 0,1,2
real-study: $(STAMP)
	$(BIN)/python studies/real_study.py --out runs/real --seeds $(SEEDS) \
		$(if $(P04),--pointing04 $(P04)) $(if $(AFLW),--aflw2000 $(AFLW))

clean:
	rm -rf $(VENV)
