"""Reading docker-compose.yml and .env.example the way Docker Compose does (enough of it),
and, where a Compose binary is installed, asking Compose itself (`config`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
STANDINS_FILE = ROOT / "docker/compose-check/standins.yml"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt}; $$ escapes a $.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")
ENV_LINE = re.compile(r"^\s*(?P<comment>#\s*)?(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def env_example() -> tuple[dict[str, str], set[str]]:
    """(NAME -> value for the lines that set a variable, every NAME mentioned as NAME= even commented)."""
    values: dict[str, str] = {}
    documented: set[str] = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ENV_LINE.match(line)
        if match:
            documented.add(match["name"])
            if not match["comment"]:
                values[match["name"]] = match["value"].strip()
    return values, documented


def referenced_variables() -> set[str]:
    """Every variable docker-compose.yml interpolates."""
    text = COMPOSE_FILE.read_text().replace("$$", "")
    return {match["name"] for match in INTERPOLATION.finditer(text)}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of one value (recursively), failing like compose on `:?`."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"] or "", match["arg"] or ""
        current = env.get(name)
        unset_or_empty = current is None or (current == "" and op.startswith(":"))
        if op.endswith("?") and unset_or_empty:
            raise LookupError(f"required variable {name} is missing a value: {arg}")
        if op.endswith("-") and unset_or_empty:
            return arg
        if op.endswith("+"):
            return "" if unset_or_empty else arg
        return current or ""

    return INTERPOLATION.sub(replace, value).replace("$$", "$")


def service_environment(service: str, env: dict[str, str]) -> dict[str, str]:
    """What a container of `service` sees: its env_file (.env, here `env`) overlaid with `environment`."""
    spec = services()[service]
    result = dict(env) if spec.get("env_file") else {}
    environment = spec.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    result.update({key: str(value) for key, value in interpolate(environment, env).items()})
    return result


def compose_command() -> list[str] | None:
    """docker-compose (v1, Debian's package) or `docker compose` (the plugin); None without either.

    `config` needs no Docker engine: only the binary."""
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    return None


def compose_config(env: dict[str, str], project_dir: Path, *overrides: Path) -> subprocess.CompletedProcess:
    """`compose config` of docker-compose.yml (plus overrides) with `env` as the project's .env.

    project_dir gets the .env and links to what the file reads relative to itself."""
    command = compose_command()
    assert command, "no Compose binary"
    (project_dir / ".env").write_text("".join(f"{key}={value}\n" for key, value in env.items()))
    for entry in ("docker-compose.yml", "docker", "requirements"):
        if not (project_dir / entry).is_symlink():
            (project_dir / entry).symlink_to(ROOT / entry)
    files = [arg for path in (project_dir / "docker-compose.yml", *overrides) for arg in ("--file", str(path))]
    return subprocess.run([*command, *files, "config"], capture_output=True, text=True, cwd=project_dir, check=False,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(project_dir)})


def resolved_services(env: dict[str, str], project_dir: Path, *overrides: Path) -> dict[str, dict[str, Any]]:
    """The services as Compose resolves them (interpolated, env_file merged into environment)."""
    result = compose_config(env, project_dir, *overrides)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]
