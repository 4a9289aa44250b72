#!/usr/bin/env bash
# make compose-check: docker-compose.yml for real, on this machine's Docker engine.
#
#   1. builds the web, mlflow and CPU worker images from docker/Dockerfile.* with the
#      build sections of docker-compose.yml (BuildKit), on the official Python base
#      when it can be pulled, else on a bookworm base made here with debootstrap;
#      torch from a CPU wheel on disk when the PyTorch index cannot be reached;
#   2. starts the stack (project "rag-compose-check", ports on 127.0.0.1 only), with
#      docker/compose-check/standins.yml only if postgres:16-alpine and
#      redis:7.4-alpine cannot be pulled, waits for every health check, creates a
#      user and a token in the web container, creates an eval-only run and a short
#      fine-tune over HTTP, waits for both to complete with results, and reads their
#      MLflow runs from the mlflow container;
#   3. stops the stack and removes its containers, volumes and network (and the
#      images it built, unless --keep-images); prints image sizes and timings.
#
# It never touches the repository's .env: the stack's .env is generated from
# .env.example in a private temporary folder, with random secrets.
#
# Usage: scripts/compose_check.sh [--keep-images] [--keep-stack]
#   --keep-images   keep the built images (a second run reuses them and their cache)
#   --keep-stack    leave the stack running on failure, to look at it
# Environment (all optional):
#   PIP_CA_BUNDLE   CA bundle handed to pip in the builds as the BuildKit secret pip_ca
#                   (default /etc/ssl/certs/ca-certificates.crt when it exists; empty: none)
#   TORCH_WHEEL     a torch wheel file for the CPU worker (default: found on disk)
#   DEBIAN_MIRROR   debootstrap's mirror (default http://deb.debian.org/debian)
#   CHECK_TIMEOUT   seconds to wait for the health checks, and again for the runs (default 900)
#   PYTHON          a Python with PyYAML (default .venv/bin/python, else python3)
#
# Needs: a Docker engine (>= 20.10) and a docker CLI that builds with BuildKit,
# docker-compose (v1) or the compose plugin, and, without Docker Hub, root and
# debootstrap. Not part of `make test` or CI: it builds torch images (minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

KEEP_IMAGES=0
KEEP_STACK=0
for arg in "$@"; do
  case "$arg" in
    --keep-images) KEEP_IMAGES=1 ;;
    --keep-stack) KEEP_STACK=1 ;;
    *) echo "usage: $0 [--keep-images] [--keep-stack]" >&2; exit 2 ;;
  esac
done

PROJECT=rag-compose-check
TAG=check
CHECK_TIMEOUT="${CHECK_TIMEOUT:-900}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PIP_CA_BUNDLE="${PIP_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}"
NICE=(nice -n 10)
START=$(date +%s)

say() { printf '[compose-check %4ss] %s\n' "$(( $(date +%s) - START ))" "$*"; }
fail() { say "FAILED: $*"; exit 1; }

# --- Tools -------------------------------------------------------------------------
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import yaml" 2>/dev/null; then PYTHON="$candidate"; break; fi
  done
fi
[ -n "$PYTHON" ] || fail "no Python with PyYAML (make venv, or apt-get install python3-yaml)"
helpers() { "$PYTHON" scripts/compose_check_helpers.py "$@"; }

# A docker CLI that builds with BuildKit: one with the buildx plugin, or a 20.x-22.x
# CLI (its `docker build` uses the engine's BuildKit under DOCKER_BUILDKIT=1; later
# CLIs need buildx for that).
DOCKER=""
while read -r candidate; do
  [ -n "$candidate" ] || continue
  if "$candidate" buildx version >/dev/null 2>&1; then DOCKER="$candidate"; break; fi
  major="$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null | cut -d. -f1 || true)"
  if [[ "$major" =~ ^[0-9]+$ ]] && [ "$major" -lt 23 ]; then DOCKER="$candidate"; break; fi
done < <(type -ap docker | awk '!seen[$0]++')
[ -n "$DOCKER" ] || fail "no docker CLI that builds with BuildKit (the buildx plugin, or Debian's docker.io)"
export DOCKER_BUILDKIT=1
"$DOCKER" info >/dev/null 2>&1 || fail "no Docker engine answers (start dockerd)"
if command -v docker-compose >/dev/null; then
  COMPOSE_BIN=(docker-compose)
elif "$DOCKER" compose version >/dev/null 2>&1; then
  COMPOSE_BIN=("$DOCKER" compose)
else
  fail "neither docker-compose nor the compose plugin is installed"
fi
say "docker CLI $DOCKER ($("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null), engine $("$DOCKER" version --format '{{.Server.Version}}')), compose: $("${COMPOSE_BIN[@]}" version --short 2>/dev/null || "${COMPOSE_BIN[@]}" version | head -1)"
say "disk: $(df -h --output=avail "$("$DOCKER" info --format '{{.DockerRootDir}}')" | tail -1 | tr -d ' ') free under the engine's root"

WORK="$(mktemp -d /tmp/compose-check.XXXXXX)"
chmod 700 "$WORK"
CREATED_IMAGES=()
STACK_UP=0
compose() { "${COMPOSE_BIN[@]}" --project-name "$PROJECT" --file "$WORK/stack.yml" "$@"; }

cleanup() {
  local rc=$?
  set +e
  if [ "$STACK_UP" = 1 ]; then
    if [ "$rc" != 0 ]; then
      say "state at the failure:"
      compose ps
      for service in $(compose config --services 2>/dev/null); do
        echo "----- logs of $service (last 60 lines)"
        compose logs --no-color --tail 60 "$service" 2>&1
      done
    fi
    if [ "$rc" != 0 ] && [ "$KEEP_STACK" = 1 ]; then
      say "--keep-stack: the stack is left running; remove it with:"
      echo "  ${COMPOSE_BIN[*]} --project-name $PROJECT --file $WORK/stack.yml down --volumes --remove-orphans"
      exit "$rc"
    fi
    say "stopping the stack and removing its containers, volumes and network"
    compose down --volumes --remove-orphans --timeout 30 2>&1 | sed 's/^/  /'
    left="$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT"; "$DOCKER" volume ls -q --filter "label=com.docker.compose.project=$PROJECT"; "$DOCKER" network ls -q --filter "label=com.docker.compose.project=$PROJECT")"
    [ -z "$left" ] || { say "left behind: $left"; rc=1; }
  fi
  if [ "$KEEP_IMAGES" = 0 ] && [ "${#CREATED_IMAGES[@]}" -gt 0 ]; then
    say "removing the images it built: ${CREATED_IMAGES[*]}"
    "$DOCKER" image rm "${CREATED_IMAGES[@]}" >/dev/null
    say "(the build cache stays: docker builder prune drops it)"
  fi
  rm -rf "$WORK"
  if [ "$rc" = 0 ]; then say "PASSED"; else say "FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT

image_exists() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
pull() { image_exists "$1" || timeout 120 "$DOCKER" pull --quiet "$1" >/dev/null 2>&1; }
image_size() { "$DOCKER" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }
declare -A BUILD_SECONDS=() BUILT_IMAGE=()
BUILD_ORDER=()
SECRET_ARGS=()
if [ -n "$PIP_CA_BUNDLE" ] && [ -s "$PIP_CA_BUNDLE" ]; then SECRET_ARGS=(--secret "id=pip_ca,src=$PIP_CA_BUNDLE"); fi

# build NAME IMAGE DOCKER-BUILD-ARGS...: a timed build, its log in $WORK, its tail shown.
build() {
  local name="$1" image="$2"; shift 2
  local t0; t0=$(date +%s)
  say "building $image ($name)"
  if ! "${NICE[@]}" "$DOCKER" build --progress=plain --tag "$image" "$@" >"$WORK/build-$name.log" 2>&1; then
    tail -40 "$WORK/build-$name.log"
    fail "building $image"
  fi
  BUILD_SECONDS[$name]=$(( $(date +%s) - t0 ))
  BUILT_IMAGE[$name]="$image"
  BUILD_ORDER+=("$name")
  CREATED_IMAGES+=("$image")
  grep -E "^#[0-9]+ [0-9.]+ (torch |Successfully installed)" "$WORK/build-$name.log" | cut -c1-220 | sed 's/^/  /' || true
  say "built $image in ${BUILD_SECONDS[$name]} s, $(image_size "$image")"
}

# --- The stack's .env: .env.example with random secrets, loopback ports ------------
WEB_PORT="$(helpers free-port)"
MLFLOW_PORT="$(helpers free-port)"
# A marker token: the check verifies it reaches the gpu worker's environment only and
# never a log, a run's config, the API or MLflow.
HF_TOKEN_MARKER="hf_composecheck$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
random() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
{
  grep -E '^[A-Z_]+=' .env.example \
    | grep -vE '^(SECRET_KEY|POSTGRES_PASSWORD|REDIS_PASSWORD|ALLOWED_HOSTS|CSRF_TRUSTED_ORIGINS|WEB_PORT|MLFLOW_PORT|WEB_BIND_ADDRESS|MLFLOW_BIND_ADDRESS|COMPOSE_PROJECT_NAME|HF_TOKEN|HF_HUB_OFFLINE)='
  echo "SECRET_KEY=$(random)"
  echo "POSTGRES_PASSWORD=$(random)"
  echo "REDIS_PASSWORD=$(random)"
  # The health check's Host is the first entry; the check's requests come as 127.0.0.1.
  echo "ALLOWED_HOSTS=localhost,127.0.0.1"
  echo "CSRF_TRUSTED_ORIGINS=https://127.0.0.1:$WEB_PORT"
  echo "WEB_BIND_ADDRESS=127.0.0.1"
  echo "WEB_PORT=$WEB_PORT"
  echo "MLFLOW_BIND_ADDRESS=127.0.0.1"
  echo "MLFLOW_PORT=$MLFLOW_PORT"
  echo "HF_TOKEN=$HF_TOKEN_MARKER"
  echo "HF_HUB_OFFLINE=1"
  echo "GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
} > "$WORK/.env"
# The compose file reads ./docker/postgres-init and .env relative to its folder.
ln -s "$ROOT/docker-compose.yml" "$ROOT/docker" "$ROOT/requirements" "$WORK/"
FILES=(--file "$WORK/docker-compose.yml")

# --- Base images --------------------------------------------------------------------
PYTHON_IMAGE="$(sed -n 's/^ARG PYTHON_IMAGE=//p' docker/Dockerfile.web)"
DEBIAN_BASE=rag-compose-check/debian:bookworm
debian_base() {
  image_exists "$DEBIAN_BASE" && { say "reusing $DEBIAN_BASE"; return; }
  command -v debootstrap >/dev/null || fail "$1 cannot be pulled and debootstrap is not installed (apt-get install debootstrap)"
  local t0; t0=$(date +%s)
  say "making $DEBIAN_BASE with debootstrap from $DEBIAN_MIRROR"
  "${NICE[@]}" debootstrap --variant=minbase bookworm "$WORK/rootfs" "$DEBIAN_MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; fail "debootstrap"; }
  rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -c . | "$DOCKER" import - "$DEBIAN_BASE" >/dev/null
  rm -rf "$WORK/rootfs"
  CREATED_IMAGES+=("$DEBIAN_BASE")
  BUILD_SECONDS[debian-base]=$(( $(date +%s) - t0 ))
  BUILT_IMAGE[debian-base]="$DEBIAN_BASE"
  BUILD_ORDER+=(debian-base)
  say "made $DEBIAN_BASE in ${BUILD_SECONDS[debian-base]} s, $(image_size "$DEBIAN_BASE")"
}

if pull "$PYTHON_IMAGE"; then
  say "Python base: $PYTHON_IMAGE"
else
  debian_base "$PYTHON_IMAGE"
  say "$PYTHON_IMAGE cannot be pulled: a bookworm stand-in (docker/compose-check/Dockerfile.python)"
  build python-base "rag-compose-check/python:$TAG" --build-arg "DEBIAN_IMAGE=$DEBIAN_BASE" \
    --file docker/compose-check/Dockerfile.python docker/compose-check
  PYTHON_IMAGE="rag-compose-check/python:$TAG"
fi

( cd "$WORK" && "${COMPOSE_BIN[@]}" "${FILES[@]}" config ) > "$WORK/resolved.yml" \
  || fail "docker-compose config refused docker-compose.yml"
DB_IMAGE="$(sed -n '/^  db:/,/^  [a-z]/s/^    image: //p' "$WORK/resolved.yml" | head -1)"
REDIS_IMAGE="$(sed -n '/^  redis:/,/^  [a-z]/s/^    image: //p' "$WORK/resolved.yml" | head -1)"
if pull "$DB_IMAGE" && pull "$REDIS_IMAGE"; then
  say "db and redis: $DB_IMAGE, $REDIS_IMAGE"
else
  debian_base "$DB_IMAGE"
  say "$DB_IMAGE / $REDIS_IMAGE cannot be pulled: stand-ins from Debian's packages (docker/compose-check/standins.yml)"
  export COMPOSE_CHECK_POSTGRES_IMAGE="rag-compose-check/postgres:$TAG" COMPOSE_CHECK_REDIS_IMAGE="rag-compose-check/redis:$TAG"
  build postgres "$COMPOSE_CHECK_POSTGRES_IMAGE" --build-arg "DEBIAN_IMAGE=$DEBIAN_BASE" \
    --file docker/compose-check/Dockerfile.postgres docker/compose-check
  build redis "$COMPOSE_CHECK_REDIS_IMAGE" --build-arg "DEBIAN_IMAGE=$DEBIAN_BASE" \
    --file docker/compose-check/Dockerfile.redis docker/compose-check
  FILES+=(--file "$ROOT/docker/compose-check/standins.yml")
  ( cd "$WORK" && "${COMPOSE_BIN[@]}" "${FILES[@]}" config ) > "$WORK/resolved.yml"
fi

# --- The application images, as docker-compose.yml builds them ----------------------
# compose_build SERVICE IMAGE [EXTRA ARGS]: the service's build section (context,
# dockerfile, args) plus the Python base and the pip CA secret.
compose_build() {
  local service="$1" image="$2"; shift 2
  local lines context dockerfile args=()
  mapfile -t lines < <(helpers build "$service" "$WORK/resolved.yml")
  context="${lines[0]}"; dockerfile="${lines[1]}"
  # the file was resolved through its link in $WORK: its folder is the repository
  [ "$context" != "$WORK" ] || context="$ROOT"
  for line in "${lines[@]:2}"; do args+=(--build-arg "$line"); done
  case "$dockerfile" in /*) ;; *) dockerfile="$context/$dockerfile" ;; esac
  build "$service" "$image" --file "$dockerfile" "${args[@]}" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" \
    "${SECRET_ARGS[@]}" "$@" "$context"
}

compose_build web "rag-compose-check/web:$TAG"
compose_build mlflow "rag-compose-check/mlflow:$TAG"

TORCH_VERSION="$(sed -n 's/^ARG TORCH_VERSION=//p' docker/Dockerfile.worker)"
TORCH_INDEX="$(helpers build worker-cpu "$WORK/resolved.yml" | sed -n 's/^TORCH_INDEX_URL=//p')"
TORCH_ARGS=()
if curl -fsS --max-time 15 -o /dev/null "${TORCH_INDEX%/}/torch/" 2>/dev/null; then
  say "torch $TORCH_VERSION from $TORCH_INDEX (the Dockerfile's torch-from-index stage)"
else
  wheel="${TORCH_WHEEL:-}"
  if [ -z "$wheel" ]; then
    # pip's own wheel folders on this machine (find-links), then pip's cache of downloads
    for dir in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true) /opt/wheels; do
      for candidate in "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*linux*_x86_64.whl; do
        [ -f "$candidate" ] && { wheel="$candidate"; break 2; }
      done
    done
  fi
  if [ -n "$wheel" ]; then
    say "$TORCH_INDEX cannot be reached: torch from $wheel (an image holding it, TORCH_WHEELS)"
    mkdir -p "$WORK/torch-wheels"
    ln "$wheel" "$WORK/torch-wheels/" 2>/dev/null || cp "$wheel" "$WORK/torch-wheels/"
    printf 'FROM scratch\nCOPY *.whl /wheels/\n' > "$WORK/torch-wheels.Dockerfile"
    build torch-wheels "rag-compose-check/torch-wheels:$TORCH_VERSION" --file "$WORK/torch-wheels.Dockerfile" "$WORK/torch-wheels"
    rm -rf "$WORK/torch-wheels"
    TORCH_ARGS=(--build-arg "TORCH_WHEELS=rag-compose-check/torch-wheels:$TORCH_VERSION")
  else
    say "$TORCH_INDEX cannot be reached and no CPU wheel of torch $TORCH_VERSION is on disk: torch from PyPI (a CUDA build, GBs)"
    TORCH_ARGS=(--build-arg "TORCH_INDEX_URL=$(pip config get global.index-url 2>/dev/null || echo https://pypi.org/simple)")
  fi
fi
compose_build worker-cpu "rag-compose-check/worker-cpu:$TAG" "${TORCH_ARGS[@]}"

# No image may keep the CA bundle or point pip at it.
for image in "rag-compose-check/web:$TAG" "rag-compose-check/mlflow:$TAG" "rag-compose-check/worker-cpu:$TAG"; do
  if "$DOCKER" image inspect --format '{{json .Config.Env}}' "$image" | grep -q PIP_CERT \
     || "$DOCKER" run --rm --entrypoint sh "$image" -c 'test -e /run/secrets/pip_ca || env | grep -q PIP_CERT'; then
    fail "$image carries the pip CA secret"
  fi
done
say "no image carries the pip CA secret"

# --- The stack -------------------------------------------------------------------
say "stack: docker-compose.yml${FILES[2]:+ + ${FILES[3]#"$ROOT/"}}, with the images built above:"
helpers adapt "$WORK/resolved.yml" "$WORK/stack.yml" \
  "web=rag-compose-check/web:$TAG" "scheduler=rag-compose-check/web:$TAG" "mlflow=rag-compose-check/mlflow:$TAG" \
  "worker-cpu=rag-compose-check/worker-cpu:$TAG" "worker-gpu=rag-compose-check/worker-cpu:$TAG" --gpu-queue-on-cpu
t0=$(date +%s)
STACK_UP=1
compose up --detach --no-build 2>&1 | sed 's/^/  /'
SERVICES=($(compose config --services))
say "waiting for the health checks of ${SERVICES[*]}"
declare -A HEALTHY_AT=()
deadline=$(( $(date +%s) + CHECK_TIMEOUT ))
while [ "${#HEALTHY_AT[@]}" -lt "${#SERVICES[@]}" ]; do
  for service in "${SERVICES[@]}"; do
    [ -z "${HEALTHY_AT[$service]:-}" ] || continue
    id="$(compose ps -q "$service")"
    state="$("$DOCKER" inspect --format '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}' "$id" 2>/dev/null || echo missing)"
    if [ "$state" = "running healthy" ]; then
      HEALTHY_AT[$service]=$(( $(date +%s) - t0 ))
      say "  $service healthy after ${HEALTHY_AT[$service]} s"
    elif [[ "$state" == exited* || "$state" == restarting* || "$state" == *unhealthy ]]; then
      say "  $service: $state"
    fi
  done
  [ "$(date +%s)" -lt "$deadline" ] || fail "not every service was healthy after $CHECK_TIMEOUT s"
  [ "${#HEALTHY_AT[@]}" -ge "${#SERVICES[@]}" ] || sleep 5
done
UP_SECONDS=$(( $(date +%s) - t0 ))
compose ps 2>&1 | sed 's/^/  /'
curl -fsS "http://127.0.0.1:$WEB_PORT/healthz" -H "Host: localhost" | sed 's/^/  healthz: /'; echo

# --- A user, a token, two runs over HTTP --------------------------------------------
say "creating a user and a token in the web container"
password="$(random)"
compose exec -T -e DJANGO_SUPERUSER_PASSWORD="$password" web \
  python manage.py createsuperuser --noinput --username compose-check --email compose-check@example.com 2>&1 | sed 's/^/  /'
token="$(compose exec -T web python manage.py drf_create_token compose-check | sed -n 's/^Generated token \([0-9a-f]*\) for user.*/\1/p')"
[ -n "$token" ] || fail "drf_create_token gave no token"

say "creating an eval-only run and a fine-tune over http://127.0.0.1:$WEB_PORT/api/runs/"
helpers runs "http://127.0.0.1:$WEB_PORT" "$token" "$WORK/runs.json" --timeout "$CHECK_TIMEOUT"

say "reading the MLflow runs from the mlflow container"
for mlflow_run in $("$PYTHON" -c 'import json, sys; print(" ".join(r["mlflow_run_id"] for r in json.load(open(sys.argv[1])).values()))' "$WORK/runs.json"); do
  compose exec -T mlflow python -c '
import sys
from mlflow.tracking import MlflowClient
run = MlflowClient("http://127.0.0.1:5000").get_run(sys.argv[1])
artifacts = [item.path for item in MlflowClient("http://127.0.0.1:5000").list_artifacts(run.info.run_id)]
print(f"  {run.info.run_id}: {run.info.run_name} {run.info.status}, {len(run.data.metrics)} metrics, {len(run.data.params)} params, artifacts {artifacts}")
assert run.info.status == "FINISHED" and run.data.metrics, "the MLflow run is not finished with metrics"
for key, value in list(run.data.params.items()) + list(run.data.tags.items()):
    assert not value.startswith("hf_composecheck"), f"HF_TOKEN in MLflow ({key})"
' "$mlflow_run" || fail "MLflow run $mlflow_run"
done

# --- HF_TOKEN: the gpu worker's environment, and nowhere else -----------------------
say "HF_TOKEN: only in the gpu worker's environment, never in a log, a run or MLflow"
for service in "${SERVICES[@]}"; do
  has="$("$DOCKER" inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$(compose ps -q "$service")" | grep -c "^HF_TOKEN=$HF_TOKEN_MARKER$" || true)"
  if [ "$service" = worker-gpu ]; then [ "$has" = 1 ] || fail "worker-gpu did not get HF_TOKEN"
  else [ "$has" = 0 ] || fail "$service got HF_TOKEN"; fi
done
if compose logs --no-color 2>&1 | grep -q "$HF_TOKEN_MARKER"; then fail "HF_TOKEN appears in the logs"; fi
if grep -q "$HF_TOKEN_MARKER" "$WORK/runs.json"; then fail "HF_TOKEN appears in a run (API)"; fi
say "  worker-gpu has it; no other container, no log line, no run, no MLflow run"

# --- Summary ------------------------------------------------------------------------
say "summary"
printf '  %-14s %-40s %9s %8s\n' build image size seconds
for name in "${BUILD_ORDER[@]}"; do
  printf '  %-14s %-40s %9s %8s\n' "$name" "${BUILT_IMAGE[$name]}" "$(image_size "${BUILT_IMAGE[$name]}")" "${BUILD_SECONDS[$name]}"
done
printf '  %-65s %8s\n' "stack up (compose up to every service healthy)" "$UP_SECONDS"
helpers summary "$WORK/runs.json"
