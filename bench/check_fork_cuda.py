"""Does a work-horse forked from a parent that preloaded the ML stack still get the GPU?

The shipped worker class runs/worker.py (PreloadingWorker) imports torch, transformers and peft in
the RQ worker's parent so that forked work-horses skip those imports. That is
only safe if the imports leave CUDA uninitialised in the parent (a CUDA context
does not survive fork). This script checks it on a GPU machine, without Django:

    python3 bench/check_fork_cuda.py
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def main() -> int:
    loaded = []
    for name in ("torch", "transformers", "peft", "sentence_transformers", "ragas", "mlflow"):
        try:
            importlib.import_module(name)
            loaded.append(name)
        except ImportError:
            pass
    import torch

    report = {"preloaded": loaded, "parent_cuda_initialized_after_imports": torch.cuda.is_initialized()}
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the work-horse
        os.close(read_fd)
        try:
            x = torch.ones(256, 256, device="cuda")
            result = {"ok": True, "sum": float((x @ x).sum()), "device": torch.cuda.get_device_name(0)}
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        os.write(write_fd, json.dumps(result).encode())
        os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.waitpid(pid, 0)
    report["forked_child_cuda"] = json.loads(data or b"{}")
    print(json.dumps(report, indent=2))
    return 0 if report["forked_child_cuda"].get("ok") and not report["parent_cuda_initialized_after_imports"] else 1


if __name__ == "__main__":
    sys.exit(main())
