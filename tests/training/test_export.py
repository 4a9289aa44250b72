"""Merged weights and GGUF of the tiny model: what Transformers reads back, written whole or not at all.

The GGUF is read back with Transformers' GGUF loader (model and tokenizer), which
is independent of our writer. A full disk is a real one: a 1-2 MB tmpfs mounted in
a user and mount namespace of its own (`unshare -rm`), where writes fail with ENOSPC.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from training.export import (
    GGUFNotSupported,
    archive_chunks,
    archive_digest,
    gguf_support,
    merge_adapter,
    rotary_to_interleaved,
    sha256_file,
    sweep_partials,
    write_gguf,
)

SETTINGS = {"prompt_format": "auto", "max_new_tokens": 12}
TEXT = "Context: The Eiffel Tower is 330 m tall.\nQuestion: How tall is the Eiffel Tower? 12345"


def make_adapter(base: str, folder: Path) -> Path:
    """A LoRA adapter with non-zero weights (a freshly initialised one adds nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    adapter = make_adapter(tiny_model, root / "adapter")
    merged = merge_adapter(tiny_model, adapter, root / "merged", generation=SETTINGS, info={"run": 7})
    paths = {"root": root, "adapter": adapter, "merged": merged.folder}
    for quantization in ("f16", "q8_0"):
        paths[quantization] = write_gguf(merged.folder, root / f"model-{quantization}.gguf", quantization=quantization).path
    return paths


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer(TEXT)["input_ids"]])).logits[0]


def test_the_merged_folder_loads_and_answers_as_the_adapter_does(exported, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = exported["merged"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "platform_export.json"} <= {p.name for p in folder.iterdir()}
    assert not list(folder.parent.glob("*.partial"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32), exported["adapter"])
    assert torch.allclose(logits(merged, tokenizer), logits(adapter, tokenizer), atol=1e-4)
    generation = GenerationConfig.from_pretrained(folder)
    assert (generation.do_sample, generation.max_new_tokens) == (False, SETTINGS["max_new_tokens"])
    assert json.loads((folder / "platform_export.json").read_text())["run"] == 7


@pytest.mark.parametrize(("quantization", "tolerance", "agree"), [("f16", 0.01, 1.0), ("q8_0", 0.1, 0.9)])
def test_transformers_gguf_loader_reads_our_gguf_back(exported, quantization, tolerance, agree):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = exported[quantization]
    reference_tokenizer = AutoTokenizer.from_pretrained(exported["merged"])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tokenizer(TEXT)["input_ids"] == reference_tokenizer(TEXT)["input_ids"]  # BOS, merges and specials round-trip
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    reference = logits(AutoModelForCausalLM.from_pretrained(exported["merged"], dtype=torch.float32), reference_tokenizer)
    got = logits(model, tokenizer)
    assert (got - reference).abs().max().item() < tolerance
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean().item() >= agree
    types = {t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types == ({"F16", "F32"} if quantization == "f16" else {"Q8_0", "F32"})


def test_the_rotary_permutation_pairs_each_heads_halves():
    weight = torch.arange(8).float().reshape(8, 1).numpy()  # one head of 8 rows: halves 0-3 and 4-7
    assert rotary_to_interleaved(weight, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    two = torch.arange(8).float().reshape(8, 1).numpy()  # two heads of 4 rows
    assert rotary_to_interleaved(two, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_other_architectures_are_refused_by_name():
    from transformers import GPT2Config, LlamaConfig

    assert gguf_support(GPT2Config()) == "GGUF export is not supported for GPT2Config"
    config = GPT2Config()
    config.architectures = ["GPT2LMHeadModel"]
    assert gguf_support(config) == "GGUF export is not supported for GPT2LMHeadModel"
    llama = LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
    llama.architectures = ["LlamaForCausalLM"]
    assert "rope scaling 'linear'" in gguf_support(llama)


def test_a_gpt2_merged_folder_gets_the_clear_message(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    model.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(GGUFNotSupported, match="^GGUF export is not supported for GPT2LMHeadModel$"):
        write_gguf(tmp_path / "gpt2", tmp_path / "model-f16.gguf", quantization="f16")
    assert not list(tmp_path.glob("*.gguf*"))


def test_the_archive_is_deterministic_and_a_valid_tar(exported, tmp_path):
    digest, size = archive_digest(exported["merged"])
    assert (digest, size) == archive_digest(exported["merged"])
    path = tmp_path / "merged.tar"
    path.write_bytes(b"".join(archive_chunks(exported["merged"])))
    assert (sha256_file(path), path.stat().st_size) == (digest, size)
    with tarfile.open(path) as archive:
        names = archive.getnames()
        archive.extractall(tmp_path / "out", filter="data")
    assert "merged/model.safetensors" in names
    assert (tmp_path / "out/merged/model.safetensors").read_bytes() == (exported["merged"] / "model.safetensors").read_bytes()


SCRIPT = """
import json, os, sys
from pathlib import Path
from training.export import merge_adapter, write_gguf
out, what, merged_from = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    if what == "merge":
        merge_adapter(sys.argv[4], sys.argv[5], out / "merged", generation={"max_new_tokens": 8})
    else:
        write_gguf(Path(merged_from), out / "model-f16.gguf", quantization="f16")
    error = ""
except OSError as exc:
    error = f"{type(exc).__name__}: {exc}"
print(json.dumps({"error": error, "left": sorted(os.listdir(out))}))
"""


def _on_a_full_disk(tmp_path: Path, size: str, *args: str) -> dict:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    script = tmp_path / "write.py"
    script.write_text(textwrap.dedent(SCRIPT))
    command = f"mount -t tmpfs -o size={size} tmpfs {mount} && exec {sys.executable} {script} {mount} " + " ".join(args)
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0 and "mount" in done.stderr and "tmpfs" in done.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_full_disk_while_merging_leaves_nothing_behind(exported, tiny_model, tmp_path):
    outcome = _on_a_full_disk(tmp_path, "1m", "merge", "-", tiny_model, str(exported["adapter"]))
    assert outcome["error"].startswith("ExportWriteError: cannot write the merged weights to ") and outcome["error"].endswith(
        "merged: No space left on device"), outcome
    assert outcome["left"] == [], outcome


def test_a_full_disk_while_writing_the_gguf_leaves_nothing_behind(exported, tmp_path):
    outcome = _on_a_full_disk(tmp_path, "1m", "gguf", str(exported["merged"]))
    assert outcome["error"].startswith("ExportWriteError: cannot write the GGUF f16 to "), outcome
    assert ": No space left on device" in outcome["error"] and outcome["left"] == [], outcome


def test_sweep_removes_what_a_killed_export_left(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / ".merged.abcd1234.partial").mkdir()
    (tmp_path / "7" / ".model-q8_0.gguf.abcd1234.partial").write_bytes(b"half")
    (tmp_path / "7" / "model-f16.gguf").write_bytes(b"whole")
    assert len(sweep_partials(tmp_path)) == 2
    assert [p.name for p in (tmp_path / "7").iterdir()] == ["model-f16.gguf"]
