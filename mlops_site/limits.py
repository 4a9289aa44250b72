"""The bound on structured input: how large and how deeply nested a JSON or YAML
text may be before any parser or validator sees it.

Python's json module, PyYAML's composer and the validators above them recurse
once per nesting level: a body of a few thousand nested brackets exhausts the
stack and answers 500. Every entry point (API JSON bodies, pasted or uploaded
YAML, `run_pipeline`, each JSONL line of a dataset) calls `check_structure` on
the raw text first, so such input is refused with a message naming the limit.

Framework-free (no Django import): runs/config.py and datasets_app/validation.py
use it outside a request too.
"""

from __future__ import annotations

import re
from typing import Literal

# Configs nest 4 levels, dataset rows 2, API bodies 3: 32 leaves room for any
# real document and stays far below every recursion limit on the way.
MAX_DEPTH = 32

# A JSON string literal (escapes included), then everything that is not a bracket.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")


class StructureLimitError(ValueError):
    """Input past a limit; the message names the limit (for the 400 answer)."""

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


def _check_json_depth(text: str, max_depth: int, source: str) -> None:
    if text.count("[") + text.count("{") <= max_depth:
        return  # not even that many openings in all: the common case, in C
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text))
    if brackets.count("[") + brackets.count("{") <= max_depth:
        return
    depth = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            if depth > max_depth:
                raise StructureLimitError(f"{source}: nested deeper than {max_depth} levels (the limit)", limit="depth")
        else:
            depth -= 1


def _check_yaml_depth(text: str, max_depth: int, source: str) -> None:
    import yaml

    # PyYAML's event parser keeps its state on a list, not the call stack: it can
    # walk any nesting; only composing the events into objects recurses.
    depth = 0
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    line = f" at line {event.start_mark.line + 1}" if event.start_mark else ""
                    raise StructureLimitError(f"{source}: nested deeper than {max_depth} levels{line} (the limit)", limit="depth")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return  # not YAML at all: the loader that comes next names the line


def check_structure(
    text: str | bytes, *, syntax: Literal["json", "yaml"], max_bytes: int | None, max_depth: int = MAX_DEPTH, source: str = "input",
) -> None:
    """Refuse `text` if it is larger than max_bytes (None: no size bound) or nests
    deeper than max_depth.

    Runs before any parser; raises StructureLimitError naming the limit. Text
    that is not valid JSON/YAML passes here and is refused by the parser.
    """
    if max_bytes is not None:
        size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", errors="surrogatepass"))
        if size > max_bytes:
            raise StructureLimitError(f"{source}: larger than {max_bytes} bytes (the limit)", limit="size")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    if syntax == "json":
        _check_json_depth(text, max_depth, source)
    elif syntax == "yaml":
        _check_yaml_depth(text, max_depth, source)
    else:
        raise ValueError(f"unknown syntax {syntax!r}")
