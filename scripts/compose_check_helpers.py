#!/usr/bin/env python3
"""The parts of scripts/compose_check.sh that read YAML or speak JSON over HTTP.

    compose_check_helpers.py build SERVICE RESOLVED.yml
        the service's build as docker-compose.yml resolves it, one line each:
        context, dockerfile, then KEY=VALUE per build argument
    compose_check_helpers.py adapt RESOLVED.yml OUT.yml SERVICE=IMAGE... [--gpu-queue-on-cpu]
        the resolved file with these images (and no build sections: the check has
        built them); --gpu-queue-on-cpu drops worker-gpu's GPU reservation, so the
        gpu queue's worker runs the CPU image on a machine without a GPU
    compose_check_helpers.py runs BASE_URL TOKEN OUT.json [--timeout SECONDS]
        creates the eval-only run (configs/eval_only.yaml) and a short fine-tune
        over the API, waits for both, prints their timings, writes ids and results
    compose_check_helpers.py summary OUT.json
        one line per run of `runs`: seconds, status, results, timestamps
    compose_check_helpers.py free-port
        a TCP port free on 127.0.0.1 now

Standard library plus PyYAML (Debian's docker-compose depends on python3-yaml; the
project's .venv has it too).
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"completed", "failed", "cancelled"}


def build(service: str, resolved: Path) -> int:
    spec = yaml.safe_load(resolved.read_text())["services"][service]["build"]
    print(spec["context"])
    print(spec.get("dockerfile", "Dockerfile"))
    args = spec.get("args") or {}
    if isinstance(args, list):
        args = dict(item.split("=", 1) for item in args)
    for key, value in args.items():
        print(f"{key}={value}")
    return 0


def adapt(resolved: Path, out: Path, images: list[str], gpu_queue_on_cpu: bool) -> int:
    config = yaml.safe_load(resolved.read_text())
    services = config["services"]
    for item in images:
        service, image = item.split("=", 1)
        services[service]["image"] = image
        services[service].pop("build", None)
        print(f"  {service}: image {image}")
    if gpu_queue_on_cpu:
        services["worker-gpu"].pop("deploy", None)
        print("  worker-gpu: no GPU reservation (rqworker gpu on the CPU image)")
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        print(sock.getsockname()[1])
    return 0


class Api:
    """Token-authenticated JSON calls, as a client behind the TLS proxy sees them."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        # X-Forwarded-Proto: the request arrives as the proxy .env.example assumes
        # (SECURE_PROXY_SSL_HEADER) would send it, so the production settings stay on.
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json",
                        "Accept": "application/json", "X-Forwarded-Proto": "https"}

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method, headers=self.headers)  # noqa: S310
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the check's own loopback URL
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{method} {path}: HTTP {exc.code}: {exc.read()[:2000].decode(errors='replace')}") from exc


def run_configs() -> dict[str, dict]:
    eval_only = yaml.safe_load((ROOT / "configs/eval_only.yaml").read_text())
    finetune = yaml.safe_load((ROOT / "configs/finetune_rag_qa.yaml").read_text())
    finetune["name"] = "compose-check-finetune"
    finetune["model"]["base"] = "local:tiny-llama"
    finetune["training"].update({"epochs": 1, "max_steps": 4})
    finetune["evaluation"].update({"max_samples": 4, "max_new_tokens": 16})
    return {"eval_only": eval_only, "finetune": finetune}


def runs(base_url: str, token: str, out: Path, timeout: float) -> int:
    api = Api(base_url, token)
    created = {}
    for label, config in run_configs().items():
        started = time.monotonic()
        run = api.call("POST", "/api/runs/", config)
        created[label] = {"id": run["id"], "status": run["status"], "started": started}
        print(f"  created {label} run #{run['id']} ({run['status']}): {json.dumps(config, separators=(',', ':'))}")

    deadline = time.monotonic() + timeout
    pending = dict(created)
    last_seen: dict[str, tuple[str, float]] = {}
    while pending and time.monotonic() < deadline:
        for label, info in list(pending.items()):
            run = api.call("GET", f"/api/runs/{info['id']}/")
            where = f"{run['status']}/{run.get('stage') or '-'}"
            # a stage's own counter ("step 3/276") moves often: print its changes every 30 s
            what = re.sub(r"\d+/\d+", "", where)
            elapsed = time.monotonic() - info["started"]
            seen_where, seen_at = last_seen.get(label, ("", -1e9))
            if what != re.sub(r"\d+/\d+", "", seen_where) or (where != seen_where and elapsed - seen_at >= 30):
                print(f"  {label} #{info['id']}: {where} at {elapsed:.0f} s")
                last_seen[label] = (where, elapsed)
            if run["status"] in TERMINAL:
                info.update(detail=run, seconds=time.monotonic() - info["started"])
                del pending[label]
        time.sleep(3)

    failures = [f"{label} run #{info['id']} did not finish in {timeout:.0f} s" for label, info in pending.items()]
    summary = {}
    for label, info in created.items():
        run = info.get("detail")
        if run is None:
            continue
        results = run.get("results") or []
        summary[label] = {"id": run["id"], "status": run["status"], "mlflow_run_id": run["mlflow_run_id"],
                          "seconds": round(info["seconds"], 1), "created_at": run["created_at"],
                          "started_at": run["started_at"], "finished_at": run["finished_at"],
                          "results": results, "config": run["config"]}
        print(f"  {label} #{run['id']}: {run['status']} in {info['seconds']:.0f} s, {len(results)} results, "
              f"MLflow run {run['mlflow_run_id'] or '-'}")
        for result in results[:12]:
            print(f"    {result['metric']:<28} {result.get('variant') or '':<10} {result.get('dataset') or '':<12} {result['value']}")
        if run["status"] != "completed":
            failures.append(f"{label} run #{run['id']} ended {run['status']}: {run.get('error')}\n{run.get('logs', '')[-3000:]}")
        elif not results:
            failures.append(f"{label} run #{run['id']} completed without results")
        elif not run["mlflow_run_id"]:
            failures.append(f"{label} run #{run['id']} has no MLflow run")
    out.write_text(json.dumps(summary, indent=2))
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


def summary(out: Path) -> int:
    for label, run in json.loads(out.read_text()).items():
        print(f"  run {label:<27} {run['seconds']:6.0f} s  (#{run['id']} {run['status']}, {len(run['results'])} results, "
              f"created {run['created_at']}, finished {run['finished_at']})")
    return 0


def main(argv: list[str]) -> int:
    match argv:
        case ["build", service, resolved]:
            return build(service, Path(resolved))
        case ["adapt", resolved, out, *images]:
            gpu = "--gpu-queue-on-cpu" in images
            return adapt(Path(resolved), Path(out), [i for i in images if i != "--gpu-queue-on-cpu"], gpu)
        case ["runs", base_url, token, out]:
            return runs(base_url, token, Path(out), 1800)
        case ["runs", base_url, token, out, "--timeout", seconds]:
            return runs(base_url, token, Path(out), float(seconds))
        case ["summary", out]:
            return summary(Path(out))
        case ["free-port"]:
            return free_port()
        case _:
            print(__doc__, file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
