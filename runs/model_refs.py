"""Will a config's model.base load here? Decided when the config is validated, with what to do when it will not.

A hub id used to pass validation on its shape alone. With the hub offline
(HF_HUB_OFFLINE=1, the Makefile's default) a made-up or uncached id was then
"valid", its data check answered 500 and its run failed a few seconds in with a
Hugging Face traceback. So a hub id is resolved where the config is validated:

- in this machine's Hugging Face cache: the `main` snapshot has config.json
  (huggingface_hub's `try_to_load_from_cache`) and weights;
- else, only when the hub is online (HF_HUB_OFFLINE unset or false): the hub
  knows the id, asked once with a short timeout (`HUB_CHECK_TIMEOUT_SECONDS`).

`local:<name>` builds and folders keep runs/config.py's rules (a known build;
a folder under MLOPS_MODEL_PATHS, which may live on the workers' disks only).
Only validation asks for this (runs/config.py `_model_reference`): the worker's
own check (`check_model_reference` before a step) stays the shape and path rule,
because a cpu worker scoring a run never loads the model and need not have it.

`model_choices(user=...)` lists what will load, for the New run form's list.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from .config import known_local_models

HUB_CHECK_TIMEOUT_SECONDS = 5.0
# A hub id the hub confirmed is not asked about again for this long (Validate, Check data, launch: one request).
FOUND_ONLINE_TTL_SECONDS = 600.0
# What from_pretrained reads the weights from; a snapshot with config.json only is a download that stopped early.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
# How many of a user's earlier base models the list offers.
EARLIER_RUNS_SCANNED = 200

_found_online: dict[str, float] = {}


def hub_offline() -> bool:
    """huggingface_hub's own rule (HF_HUB_OFFLINE, else TRANSFORMERS_OFFLINE), read now: its constant is fixed at import."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in TRUE_VALUES


def hub_cache_dir() -> Path:
    """The folder huggingface_hub caches models in (HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME/hub, XDG_CACHE_HOME), read now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def _cached_config(repo_id: str) -> Path | None:
    """config.json of the id's `main` snapshot in this machine's cache, or None."""
    cache = hub_cache_dir()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # the web image has no model libraries: the cache's documented layout, read directly
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        try:
            revision = (repo / "refs" / "main").read_text().strip()
        except OSError:
            return None
        found: object = repo / "snapshots" / revision / "config.json"
        found = str(found) if Path(str(found)).is_file() else None
    else:
        try:
            found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)
        except (OSError, ValueError):  # an unreadable cache, or an id huggingface_hub refuses: not cached
            return None
    return Path(found) if isinstance(found, str) else None


def _has_weights(snapshot: Path) -> bool:
    return any((snapshot / name).is_file() for name in WEIGHT_FILES) or any(p.is_file() for p in snapshot.glob("*.safetensors"))


def hub_model_cached(repo_id: str) -> bool:
    """The id's `main` snapshot is in this machine's cache with config.json and weights: from_pretrained loads it offline."""
    config = _cached_config(repo_id)
    return config is not None and _has_weights(config.parent)


def cached_hub_models() -> list[str]:
    """Every hub model in this machine's cache that would load offline (huggingface_hub's scan_cache_dir), sorted."""
    cache = hub_cache_dir()
    if not cache.is_dir():
        return []
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:
        ids = [d.name.removeprefix("models--").replace("--", "/") for d in cache.glob("models--*") if d.is_dir()]
    else:
        try:
            ids = [repo.repo_id for repo in scan_cache_dir(cache).repos if repo.repo_type == "model"]
        except OSError:
            return []
    return sorted(repo_id for repo_id in ids if hub_model_cached(repo_id))


@dataclass(frozen=True)
class HubAnswer:
    found: bool
    problem: str = ""  # why not, when not found: "not found" or the reason the hub could not be asked


def ask_the_hub(repo_id: str, *, timeout: float | None = None) -> HubAnswer:
    """Whether the hub (HF_ENDPOINT) knows a model id: one GET of its model API, HF_TOKEN sent when set.

    A gated model answers there without a token (its files need one: the worker says so); a private or
    missing one answers 401/404, which the hub does not tell apart.
    """
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    if urlsplit(endpoint).scheme not in ("http", "https"):
        return HubAnswer(False, f"HF_ENDPOINT is not an http(s) URL ({endpoint!r})")
    request = urllib.request.Request(f"{endpoint}/api/models/{quote(repo_id, safe='/')}", headers={"Accept": "application/json"})  # noqa: S310 - http(s), checked above
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        # The scheme is checked above: http(s) only, never file:.
        with urllib.request.urlopen(request, timeout=HUB_CHECK_TIMEOUT_SECONDS if timeout is None else timeout) as response:  # noqa: S310
            body = response.read(1_000_000)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403, 404):
            return HubAnswer(False, "not found")
        return HubAnswer(False, f"the hub answered HTTP {exc.code}")
    except (urllib.error.URLError, OSError) as exc:  # no route, DNS, refused, timed out
        reason = getattr(exc, "reason", None) or exc
        return HubAnswer(False, f"the hub did not answer ({reason})")
    try:
        found = isinstance(json.loads(body), dict)
    except ValueError:
        found = False
    return HubAnswer(True) if found else HubAnswer(False, "the hub's answer was not a model description")


def _local_choices_text() -> str:
    return ", ".join("local:" + name for name in known_local_models())


def check_hub_model(repo_id: str) -> None:
    """Refuse a hub id that will not load here, saying what to do. Raises ValueError.

    Cached (config.json and weights) passes; otherwise, with the hub online, the hub must know the id.
    """
    if hub_model_cached(repo_id):
        return
    partly = _cached_config(repo_id) is not None
    instead = f"or use one of {_local_choices_text()}"
    download = f"download it into this machine's cache where there is network (hf download {repo_id})"
    if hub_offline():
        if partly:
            raise ValueError(f"{repo_id!r} is only partly in this machine's Hugging Face cache (config.json but no weights) and the "
                             f"hub is offline (HF_HUB_OFFLINE): finish the download where there is network (hf download {repo_id}) {instead}")
        raise ValueError(f"{repo_id!r} is not in this machine's Hugging Face cache and the hub is offline (HF_HUB_OFFLINE): {download} {instead}")
    confirmed = _found_online.get(repo_id)
    if confirmed is not None and time.monotonic() - confirmed < FOUND_ONLINE_TTL_SECONDS:
        return
    answer = ask_the_hub(repo_id)
    if answer.found:
        _found_online[repo_id] = time.monotonic()
        return
    if answer.problem == "not found":
        raise ValueError(f"{repo_id!r} was not found on the Hugging Face hub (nor in this machine's cache): check the id (org/name; a "
                         f"private model needs HF_TOKEN where the web app runs) {instead}")
    raise ValueError(f"{repo_id!r} is not in this machine's Hugging Face cache and {answer.problem}: {download}, set HF_HUB_OFFLINE=1 "
                     f"if this machine has no network, {instead}")


@dataclass(frozen=True)
class ModelChoice:
    value: str
    label: str


def _local_label(name: str) -> str:
    try:
        from training.local_models import LOCAL_MODELS
        from training.tiny_model import local_model_dir
    except ImportError:  # the web image: names only
        return "built offline on first use"
    built = local_model_dir(name).is_dir()
    description = LOCAL_MODELS[name].description if name in LOCAL_MODELS else ""
    return f"{description} ({'built' if built else 'built offline on first use'})"


def model_choices(*, user) -> list[ModelChoice]:
    """The base models that will load here, for the New run form's list (free text stays allowed).

    The known local: builds, the hub models in this machine's cache, and the base models of the user's
    earlier runs that still pass validation without asking the hub (with the hub online, a hub id is listed
    as "downloads from the hub"; it is checked when the form is validated).
    """
    from .config import check_model_reference
    from .models import PipelineRun

    choices = [ModelChoice(f"local:{name}", _local_label(name)) for name in known_local_models()]
    choices += [ModelChoice(repo_id, "in this machine's Hugging Face cache") for repo_id in cached_hub_models()]
    listed = {c.value for c in choices}
    earlier = PipelineRun.objects.filter(owner=user).order_by("-created_at").values_list("base_model", flat=True)[:EARLIER_RUNS_SCANNED]
    for base in dict.fromkeys(earlier):
        if not base or base in listed:
            continue
        try:
            check_model_reference(base)  # known local: builds are listed already; this drops folders no longer allowed
        except ValueError:
            continue
        folder = os.path.isabs(base)
        if not folder and hub_offline():
            continue  # a hub id not in the cache (it would be listed above) with the hub offline: it would not load
        choices.append(ModelChoice(base, "used in your earlier runs" + ("" if folder else "; downloads from the hub")))
        listed.add(base)
    return choices


def hub_note() -> str:
    """One sentence for the form's help: what a hub id needs on this machine."""
    if hub_offline():
        return "The Hugging Face hub is offline here (HF_HUB_OFFLINE): a hub id loads only if it is already in this machine's cache."
    return "A hub id not in this machine's cache is looked up on the Hugging Face hub when you validate, and downloaded by the run."
