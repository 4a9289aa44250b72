"""docker-compose.yml, the Dockerfiles and .env.example are wired to code that exists.

Docker does not run on the test machines: these tests read the files and check
each reference against the project (management commands, modules, settings,
queues, files) instead of building images.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import get_commands
from django.urls import reverse

from .compose_helpers import ROOT, env_example, interpolate, referenced_variables, service_environment, services

DESIGN_SERVICES = {"db", "redis", "mlflow", "web", "worker-gpu", "worker-cpu", "scheduler"}
DJANGO_SERVICES = ("web", "worker-gpu", "worker-cpu", "scheduler")
SECRETS = ("SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
# Where Python code reads its environment: settings, the gunicorn config, the reaper's schedule.
ENV_READERS = ("mlops_site/settings.py", "mlops_site/gunicorn_conf.py", "runs/cron.py")
ENV_READ = re.compile(r"""(?:os\.environ\.get|os\.environ\[|env(?:bool|int|list))\(?\s*["']([A-Z][A-Z0-9_]*)["']""")


def example_env_with_secrets() -> dict[str, str]:
    values, _ = env_example()
    return {**values, **{name: f"test-{name.lower()}-value" for name in SECRETS}}


def command_of(service: str) -> list[str]:
    command = services()[service]["command"]
    return command if isinstance(command, list) else command.split()


def volumes_of(service: str) -> dict[str, str]:
    """target path -> source (named volume or host path)."""
    mounts = {}
    for volume in services()[service].get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
    return mounts


def healthcheck_command(service: str) -> list[str]:
    test = services()[service]["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL"), f"{service}: healthcheck.test must start with CMD or CMD-SHELL"
    return test[1:]


def test_it_has_every_service_of_the_design():
    assert set(services()) == DESIGN_SERVICES


def test_every_service_has_a_healthcheck_and_dependencies_wait_for_health():
    for name, spec in services().items():
        assert healthcheck_command(name), f"{name} has no healthcheck"
        for dependency, condition in (spec.get("depends_on") or {}).items():
            assert dependency in DESIGN_SERVICES
            assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
    for name in ("web", "worker-gpu", "worker-cpu"):
        assert set(services()[name]["depends_on"]) == {"db", "redis", "mlflow"}
    assert set(services()["mlflow"]["depends_on"]) == {"db"}
    assert set(services()["scheduler"]["depends_on"]) == {"redis"}


def test_the_database_is_postgres_16_alpine_on_a_volume():
    db = services()["db"]
    assert db["image"] == "postgres:16-alpine"
    assert volumes_of("db")["/var/lib/postgresql/data"] == "pgdata"
    assert "pg_isready" in " ".join(healthcheck_command("db"))
    init_dir = volumes_of("db")["/docker-entrypoint-initdb.d"]
    assert (ROOT / init_dir).is_dir() and any((ROOT / init_dir).glob("*.sh"))
    assert "MLFLOW_DB" in (ROOT / init_dir / "10-mlflow-database.sh").read_text()


def test_redis_never_evicts_jobs_and_keeps_them_on_disk():
    command = command_of("redis")
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD:?")
    assert volumes_of("redis")["/data"] == "redis-data"
    assert healthcheck_command("redis") == ["redis-cli", "ping"]


def test_mlflow_keeps_runs_in_postgres_and_serves_artifacts_from_a_volume():
    from mlflow.utils.uri import extract_db_type_from_uri
    from sqlalchemy.dialects import registry

    env = service_environment("mlflow", example_env_with_secrets())
    store = env["MLFLOW_BACKEND_STORE_URI"]
    assert store.startswith("postgresql+psycopg://") and "@db:5432/mlflow" in store
    assert extract_db_type_from_uri(store) == "postgresql"
    assert registry.load("postgresql.psycopg")  # the SQLAlchemy dialect of psycopg 3, which requirements/mlflow.txt installs

    command = command_of("mlflow")
    artifacts = command[command.index("--artifacts-destination") + 1]
    assert volumes_of("mlflow")[artifacts] == "mlflow-artifacts"
    assert "--serve-artifacts" in command and command[command.index("--port") + 1] == "5000"
    assert any(port.endswith(":5000:5000") or port == "5000:5000" for port in services()["mlflow"]["ports"])
    assert "mlflow" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")  # the name the workers use

    pins = (ROOT / "requirements/mlflow.txt").read_text()
    worker_pins = (ROOT / "requirements/worker.txt").read_text()
    mlflow_pin = re.search(r"^mlflow==\S+$", worker_pins, re.M)[0]
    assert mlflow_pin in pins and re.search(r"^psycopg\[binary\]==", pins, re.M)
    dockerfile = (ROOT / "docker/Dockerfile.mlflow").read_text()
    assert "requirements/mlflow.txt" in dockerfile


def test_the_web_service_migrates_collects_static_and_runs_gunicorn():
    assert command_of("web") == ["sh", "docker/web-entrypoint.sh"]
    entrypoint = (ROOT / "docker/web-entrypoint.sh").read_text()
    steps = [line for line in entrypoint.splitlines() if line and not line.startswith(("#", "set "))]
    assert steps == [
        "python manage.py migrate --noinput",
        "python manage.py collectstatic --noinput --verbosity 0",
        "exec gunicorn -c python:mlops_site.gunicorn_conf mlops_site.wsgi",
    ]
    assert {"migrate", "collectstatic"} <= set(get_commands())
    assert importlib.util.find_spec("mlops_site.wsgi") and importlib.util.find_spec("mlops_site.gunicorn_conf")
    assert "8000:8000" in services()["web"]["ports"]
    assert service_environment("web", example_env_with_secrets())["WEB_BIND"] == "0.0.0.0:8000"
    assert healthcheck_command("web") == ["python", "docker/healthcheck.py", "http", "http://127.0.0.1:8000/healthz"]
    assert reverse("healthz") == "/healthz"


@pytest.mark.parametrize(("service", "queue"), [("worker-gpu", "gpu"), ("worker-cpu", "cpu")])
def test_each_worker_runs_rqworker_on_its_queue(service, queue):
    assert command_of(service) == ["python", "manage.py", "rqworker", queue]
    assert "rqworker" in get_commands()
    assert queue in settings.RQ_QUEUES
    assert healthcheck_command(service) == ["python", "docker/healthcheck.py", "rq-worker", queue]
    from runs.orchestration import JOB_QUEUES

    assert queue in JOB_QUEUES.values()


def test_the_scheduler_runs_the_reaper_schedule():
    command = command_of("scheduler")
    assert command[:3] == ["python", "manage.py", "rqcron"] and "rqcron" in get_commands()
    assert importlib.util.find_spec(command[3]), f"{command[3]} is not a module"
    assert services()["scheduler"]["build"] == services()["web"]["build"]  # no torch needed to schedule
    assert healthcheck_command("scheduler") == ["python", "docker/healthcheck.py", "rq-cron"]


def test_the_gpu_worker_reserves_an_nvidia_gpu_and_gets_a_cuda_torch():
    (device,) = services()["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert "deploy" not in services()["worker-cpu"]

    env = example_env_with_secrets()
    gpu_args = interpolate(services()["worker-gpu"]["build"]["args"], env)
    cpu_args = interpolate(services()["worker-cpu"]["build"]["args"], env)
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", gpu_args["TORCH_INDEX_URL"])
    assert cpu_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", interpolate(services()["worker-gpu"]["build"]["args"], {})["TORCH_INDEX_URL"])
    for service in ("worker-gpu", "worker-cpu"):
        assert services()[service]["build"]["dockerfile"] == "docker/Dockerfile.worker"


def test_workers_share_the_model_and_data_volumes():
    env = service_environment("worker-gpu", example_env_with_secrets())
    data, models = env["MLOPS_DATA_DIR"], env["MLOPS_MODELS_DIR"]
    for worker in ("worker-gpu", "worker-cpu"):
        mounts = volumes_of(worker)
        assert mounts[data] == "app-data" and mounts[models] == "models"
        assert mounts[env["HF_HOME"]] == "hf-cache"
        assert mounts[f"{env['MLOPS_VAR_DIR']}/runs"] == "run-outputs"
    assert volumes_of("web")[data] == "app-data"  # uploads land where the workers read them
    declared = set(services_file_volumes())
    for service in services():
        for source in volumes_of(service).values():
            assert source.startswith("./") or source in declared, f"{service}: undeclared volume {source}"


def services_file_volumes() -> dict:
    from .compose_helpers import compose

    return compose()["volumes"]


def test_the_django_services_run_in_production_mode_against_the_other_services():
    env = example_env_with_secrets()
    for service in DJANGO_SERVICES:
        container = service_environment(service, env)
        assert container["MLOPS_PRODUCTION"] == "true" and container["DJANGO_SETTINGS_MODULE"] == "mlops_site.settings"
        assert container["DATABASE_URL"].startswith("postgres://") and "@db:5432/" in container["DATABASE_URL"]
        assert container["REDIS_URL"].startswith("redis://:") and container["REDIS_URL"].endswith("@redis:6379/0")
        assert container["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert container["SECRET_KEY"] == env["SECRET_KEY"]


def test_every_variable_the_code_and_compose_use_is_documented_in_env_example():
    _, documented = env_example()
    read = {name for path in ENV_READERS for name in ENV_READ.findall((ROOT / path).read_text())}
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "LOG_FORMAT", "ALLOWED_HOSTS"} <= read  # the pattern finds them
    assert read - documented == set()
    assert referenced_variables() - documented == set()


def test_no_secret_has_a_usable_default():
    values, _ = env_example()
    text = (ROOT / "docker-compose.yml").read_text()
    for name in SECRETS:
        assert values[name] == "", f"{name} must be empty in .env.example"
        uses = re.findall(rf"\$\{{{name}(:?[-?+]?)", text)
        assert uses and set(uses) == {":?"}, f"every use of {name} in docker-compose.yml must be ${{{name}:?...}}"
    with pytest.raises(LookupError, match="SECRET_KEY"):
        service_environment("web", {**example_env_with_secrets(), "SECRET_KEY": ""})


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    text = (ROOT / "docker" / name).read_text().replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


@pytest.mark.parametrize("name", ["Dockerfile.web", "Dockerfile.worker", "Dockerfile.mlflow"])
def test_images_are_pinned_run_as_a_user_and_copy_files_that_exist(name):
    instructions = dockerfile_instructions(name)
    args = {value.split("=", 1)[0]: value.split("=", 1)[1] for op, value in instructions if op == "ARG" and "=" in value}
    (base,) = [value for op, value in instructions if op == "FROM"]
    image = args.get(base.strip("${}"), base)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", image), image
    users = [value for op, value in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    for op, value in instructions:
        if op == "COPY":
            sources = [part for part in value.split() if not part.startswith("--")][:-1]
            for source in sources:
                assert source == "." or (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
    installs = " ".join(value for op, value in instructions if op == "RUN")
    for requirement in re.findall(r"-r (\S+)", installs):
        assert (ROOT / requirement).exists() or (ROOT / "requirements" / Path(requirement).name).exists()


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        elif line and not line.startswith("-"):
            names.add(re.split(r"[\[=<>~!; ]", line)[0].lower())
    return names


def test_the_web_image_has_no_torch():
    instructions = dockerfile_instructions("Dockerfile.web")
    installs = " ".join(value for op, value in instructions if op == "RUN")
    assert re.findall(r"-r (\S+)", installs) == ["requirements/web.txt"]
    assert "torch" not in installs
    assert not requirement_names(ROOT / "requirements/web.txt") & {"torch", "transformers", "peft", "ragas", "sentence-transformers"}


def test_the_worker_image_installs_the_pinned_torch_from_the_chosen_index():
    instructions = dockerfile_instructions("Dockerfile.worker")
    args = dict(value.split("=", 1) for op, value in instructions if op == "ARG" and "=" in value)
    torch_pin = re.search(r"^torch==(\S+)$", (ROOT / "requirements/worker.txt").read_text(), re.M)[1]
    assert args["TORCH_VERSION"] == torch_pin
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    installs = " ".join(value for op, value in instructions if op == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in installs
    assert "-r requirements/worker.txt" in installs


def test_the_image_context_leaves_out_secrets_and_local_state():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".env", ".venv", "var", ".git", "staticfiles"} <= ignored
    assert "!.env.example" in ignored


def test_the_scripts_the_containers_run_exist():
    for path in ("docker/web-entrypoint.sh", "docker/healthcheck.py", "docker/postgres-init/10-mlflow-database.sh"):
        assert (ROOT / path).is_file(), path
    assert (ROOT / "mlops_site/gunicorn_conf.py").is_file()


@pytest.mark.skipif(not (shutil.which("docker-compose") or shutil.which("docker")), reason="no docker compose here")
def test_docker_compose_itself_accepts_the_file(tmp_path):
    """Where a Compose binary exists, let it validate and interpolate the file too."""
    compose = [shutil.which("docker-compose")] if shutil.which("docker-compose") else [shutil.which("docker"), "compose"]
    if subprocess.run([*compose, "version"], capture_output=True, check=False).returncode != 0:
        pytest.skip("the docker CLI has no compose plugin here")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in example_env_with_secrets().items()))
    for entry in ("docker-compose.yml", "docker", "requirements"):
        (tmp_path / entry).symlink_to(ROOT / entry)
    result = subprocess.run([*compose, "--project-directory", str(tmp_path), "config", "--quiet"], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
