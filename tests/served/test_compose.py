"""docker-compose.yml, the Dockerfiles and .env.example are wired to code that exists.

These tests read the files and check each reference against the project
(management commands, modules, settings, queues, files) instead of building
images; where a Compose binary is installed (docker-compose v1 or the plugin:
`config` needs no engine), Compose itself resolves the file and the tests check
its reading against theirs. Building and running the images is `make
compose-check` (scripts/compose_check.sh), too slow for the suite.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import get_commands
from django.urls import reverse

from .compose_helpers import (
    ROOT,
    STANDINS_FILE,
    compose_command,
    compose_config,
    env_example,
    interpolate,
    referenced_variables,
    resolved_services,
    service_environment,
    services,
)

DESIGN_SERVICES = {"db", "redis", "mlflow", "web", "worker-gpu", "worker-cpu", "scheduler"}
DJANGO_SERVICES = ("web", "worker-gpu", "worker-cpu", "scheduler")
SECRETS = ("SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD")
WORKER_CLASS = "runs.worker.PreloadingWorker"
needs_compose = pytest.mark.skipif(compose_command() is None, reason="no docker-compose or compose plugin installed")
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
    assert interpolate(services()["mlflow"]["ports"], example_env_with_secrets()) == ["127.0.0.1:5000:5000"]
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
    (port,) = interpolate(services()["web"]["ports"], example_env_with_secrets())
    assert port == "127.0.0.1:8000:8000"  # plain HTTP for the proxy: loopback unless WEB_BIND_ADDRESS says otherwise
    assert service_environment("web", example_env_with_secrets())["WEB_BIND"] == "0.0.0.0:8000"
    assert healthcheck_command("web") == ["python", "docker/healthcheck.py", "http", "http://127.0.0.1:8000/healthz"]
    assert reverse("healthz") == "/healthz"


@pytest.mark.parametrize(("service", "queue"), [("worker-gpu", "gpu"), ("worker-cpu", "cpu")])
def test_each_worker_runs_rqworker_on_its_queue(service, queue):
    assert command_of(service) == ["python", "manage.py", "rqworker", queue, "--worker-class", WORKER_CLASS]
    assert "rqworker" in get_commands()
    module, name = WORKER_CLASS.rsplit(".", 1)
    from rq import Worker

    assert issubclass(getattr(importlib.import_module(module), name), Worker)
    assert queue in settings.RQ_QUEUES
    assert healthcheck_command(service) == ["python", "docker/healthcheck.py", "rq-worker", queue]
    from runs.kinds import KINDS

    # some kind's graph sends jobs to this queue
    assert any(queue in kind.graph({"evaluation": {"answers": "generate"}, "selection": {}}).queues.values() for kind in KINDS.values())


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
    bases = [value for op, value in instructions if op == "FROM"]
    final = bases[-1]  # the image's own stage: the Python base, as are the helper stages but TORCH_WHEELS's
    assert final == "${PYTHON_IMAGE}"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", args["PYTHON_IMAGE"]), args["PYTHON_IMAGE"]
    for base in bases[:-1]:
        assert re.fullmatch(r"\$\{(PYTHON_IMAGE|TORCH_WHEELS)\} AS [a-z-]+", base), base
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
    # by default the wheel comes from the stage that downloads it from TORCH_INDEX_URL ...
    assert args["TORCH_WHEELS"] == "torch-from-index"
    assert ("FROM", "${PYTHON_IMAGE} AS torch-from-index") in instructions
    assert ("FROM", "${TORCH_WHEELS} AS torch-wheels") in instructions
    downloads, install = [value for op, value in instructions if op == "RUN" and "torch==${TORCH_VERSION}" in value]
    assert '--dest /wheels --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in downloads
    # ... and is installed from that stage's /wheels alone, mounted for the step, then the rest from PyPI
    assert "--mount=type=bind,from=torch-wheels,source=/wheels,target=/tmp/torch-wheels" in install
    assert '--no-deps --no-index --find-links /tmp/torch-wheels "torch==${TORCH_VERSION}"' in install
    assert install.index("torch==") < install.index("-r requirements/worker.txt")
    assert "--require-hashes -r requirements/models.txt" in install


@pytest.mark.parametrize("name", ["Dockerfile.web", "Dockerfile.worker", "Dockerfile.mlflow"])
def test_the_pip_ca_bundle_is_a_build_secret_never_a_layer(name):
    text = (ROOT / "docker" / name).read_text()
    assert not re.match(r"#\s*syntax=", text)  # the engine's own frontend: a build pulls no frontend image from Docker Hub
    for op, value in dockerfile_instructions(name):
        if op == "RUN" and re.search(r"\bpip (install|download)\b", value):
            assert value.startswith("--mount=type=secret,id=pip_ca") or " --mount=type=secret,id=pip_ca " in value, value
            assert "export PIP_CERT=/run/secrets/pip_ca" in value
        assert not (op in ("ENV", "ARG") and "PIP_CERT" in value), f"{name}: {op} {value}"
        assert not (op in ("COPY", "ADD") and re.search(r"\.(crt|pem)\b|ca-certificates", value)), f"{name}: {op} {value}"


def test_the_image_context_leaves_out_secrets_and_local_state():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".env", ".venv", "var", ".git", "staticfiles"} <= ignored
    assert "!.env.example" in ignored


def test_the_scripts_the_containers_run_exist():
    for path in ("docker/web-entrypoint.sh", "docker/healthcheck.py", "docker/postgres-init/10-mlflow-database.sh"):
        assert (ROOT / path).is_file(), path
    assert (ROOT / "mlops_site/gunicorn_conf.py").is_file()


def test_the_hugging_face_token_reaches_the_gpu_worker_only():
    _, documented = env_example()
    assert {"HF_TOKEN", "HF_HUB_OFFLINE"} <= documented
    env = {**example_env_with_secrets(), "HF_TOKEN": "hf_secret", "HF_HUB_OFFLINE": "1"}
    for service in DJANGO_SERVICES:
        container = service_environment(service, env)
        if service == "worker-gpu":
            assert container["HF_TOKEN"] == "hf_secret" and container["HF_HUB_OFFLINE"] == "1"
        else:  # .env reaches them through env_file: the compose file blanks it
            assert container["HF_TOKEN"] == "", service
    assert service_environment("worker-gpu", example_env_with_secrets())["HF_HUB_OFFLINE"] == "0"
    assert "HF_TOKEN" not in service_environment("mlflow", env) and "HF_TOKEN" not in service_environment("db", env)


def test_docker_compose_v1_can_read_the_file():
    # docker-compose v1 (Debian's package) refuses a top-level `name:`; the project
    # name comes from COMPOSE_PROJECT_NAME in .env instead.
    from .compose_helpers import compose

    assert set(compose()) <= {"services", "volumes", "networks"} | {key for key in compose() if key.startswith("x-")}
    values, _ = env_example()
    assert values["COMPOSE_PROJECT_NAME"] == "rag-finetune-platform"


def published_port(port: str | dict) -> tuple[str, str, str]:
    """(host address, published, target) from v1's "IP:PUBLISHED:TARGET/tcp" or v2's mapping."""
    if isinstance(port, dict):
        return port.get("host_ip", ""), str(port["published"]), str(port["target"])
    host, published, target = port.removesuffix("/tcp").split(":")
    return host, published, target


@needs_compose
def test_compose_itself_resolves_the_file_as_these_tests_read_it(tmp_path):
    env = {**example_env_with_secrets(), "HF_TOKEN": "hf_secret"}
    resolved = resolved_services(env, tmp_path)
    assert set(resolved) == DESIGN_SERVICES
    for service in DJANGO_SERVICES + ("mlflow", "db"):
        assert {key: str(value) for key, value in resolved[service]["environment"].items()} == service_environment(service, env), service
    for service in services():
        assert resolved[service]["healthcheck"]["test"] == services()[service]["healthcheck"]["test"]
        command = services()[service].get("command")
        if command:
            assert resolved[service]["command"] == interpolate(command_of(service), env)
    assert published_port(resolved["web"]["ports"][0]) == ("127.0.0.1", "8000", "8000")
    assert published_port(resolved["mlflow"]["ports"][0]) == ("127.0.0.1", "5000", "5000")
    assert resolved["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


@needs_compose
def test_compose_refuses_to_resolve_the_file_without_each_secret(tmp_path):
    for name in SECRETS:
        project = tmp_path / name
        project.mkdir()
        result = compose_config({**example_env_with_secrets(), name: ""}, project)
        assert result.returncode != 0 and name in result.stderr, (name, result.stderr)


@needs_compose
def test_the_checks_stand_ins_only_replace_the_db_and_redis_images(tmp_path):
    env = {**example_env_with_secrets(), "COMPOSE_CHECK_POSTGRES_IMAGE": "check/postgres", "COMPOSE_CHECK_REDIS_IMAGE": "check/redis"}
    plain = resolved_services(env, tmp_path)
    overridden = resolved_services(env, tmp_path, STANDINS_FILE)
    assert overridden["db"]["image"] == "check/postgres" and overridden["redis"]["image"] == "check/redis"
    for service in plain:  # (a merge may reorder volumes)
        for key in set(plain[service]) | set(overridden[service]):
            if key == "volumes":
                assert sorted(plain[service][key]) == sorted(overridden[service][key]), service
            elif not (key == "image" and service in ("db", "redis")):
                assert plain[service][key] == overridden[service][key], (service, key)


def test_the_stand_in_images_keep_the_official_images_contract():
    import yaml

    standins = yaml.safe_load(STANDINS_FILE.read_text())["services"]
    assert {name: set(spec) for name, spec in standins.items()} == {"db": {"image"}, "redis": {"image"}}
    entrypoint = (ROOT / "docker/compose-check/docker-entrypoint.sh").read_text()
    for variable in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "PGDATA", "/docker-entrypoint-initdb.d"):
        assert variable in entrypoint
    postgres = (ROOT / "docker/compose-check/Dockerfile.postgres").read_text()
    assert "PGDATA=/var/lib/postgresql/data" in postgres
    assert "ENTRYPOINT [\"docker-entrypoint.sh\"]" in postgres
    redis = (ROOT / "docker/compose-check/Dockerfile.redis").read_text()
    assert "redis-server" in redis and "WORKDIR /data" in redis
    assert command_of("redis")[0] == "redis-server"  # the stand-in has no entrypoint: the command runs as given


def load_check_helpers():
    spec = importlib.util.spec_from_file_location("compose_check_helpers", ROOT / "scripts/compose_check_helpers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("compose_check_helpers", module)
    spec.loader.exec_module(module)
    return module


def test_the_checks_runs_are_valid_configs_of_a_short_pipeline():
    from runs.config import RunConfig

    configs = load_check_helpers().run_configs()
    eval_only = RunConfig.model_validate(configs["eval_only"])
    assert eval_only.kind == "eval_only"
    finetune = RunConfig.model_validate(configs["finetune"])
    assert finetune.kind == "finetune" and finetune.model.base == "local:tiny-llama"
    assert finetune.training.max_steps <= 10 and finetune.evaluation.max_samples <= 10


def test_the_check_runs_the_gpu_queue_on_the_cpu_image_without_the_reservation(tmp_path, capsys):
    import yaml

    resolved = tmp_path / "resolved.yml"
    resolved.write_text(yaml.safe_dump({"services": {name: dict(spec) for name, spec in services().items()}}))
    out = tmp_path / "stack.yml"
    load_check_helpers().adapt(resolved, out, ["worker-gpu=check/worker-cpu", "web=check/web"], gpu_queue_on_cpu=True)
    stack = yaml.safe_load(out.read_text())["services"]
    assert stack["worker-gpu"]["image"] == "check/worker-cpu" and "build" not in stack["worker-gpu"]
    assert "deploy" not in stack["worker-gpu"]
    assert stack["worker-gpu"]["command"] == services()["worker-gpu"]["command"]  # still the gpu queue
    assert stack["web"]["image"] == "check/web" and "build" not in stack["web"]
    assert stack["mlflow"]["build"] == services()["mlflow"]["build"]
