"""Helpers shared by the Python golden-data tools (convert_stories260k.py, make_tiny_models.py,
golden_forward.py). Not a script: imported by them.

Set up the interpreter once with `bash tools/setup-python.sh` (or use any Python with torch,
transformers, safetensors, tokenizers and numpy), then run the scripts themselves, e.g.
`tools/.venv/bin/python tools/golden_forward.py`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
STORIES_DIR = REPO_ROOT / "apps/studio/public/models/stories260K"
FIXTURES_DIR = REPO_ROOT / "packages/models/test/fixtures"
GOLDEN_DIR = REPO_ROOT / "packages/models/test/golden/forward"
SHAKESPEARE_4K = FIXTURES_DIR / "text/shakespeare-4k.txt"
TINY_MODELS = ["tiny-llama", "tiny-llama3", "tiny-qwen2", "tiny-qwen3", "tiny-gpt2"]


def rel(path: Path) -> str:
    """Path relative to the repository root, with forward slashes (absolute when outside)."""
    path = path.resolve()
    return path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)


def _dumps(obj: Any, indent: int) -> str:
    """JSON with objects indented and lists of scalars kept on one line (small, diffable)."""
    pad = "  " * indent
    inner = "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in obj):
            return "[" + ",".join(_scalar(v) for v in obj) + "]"
        return "[\n" + ",\n".join(inner + _dumps(v, indent + 1) for v in obj) + "\n" + pad + "]"
    return _scalar(obj)


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"non-finite float {v} cannot go into JSON")
        return repr(v)  # the shortest text that reads back as the same double
    return json.dumps(v, ensure_ascii=False)


def write_json(path: Path, obj: Any, pretty_lists: bool = True) -> None:
    """Writes JSON deterministically (insertion order of keys, '\\n' at the end)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _dumps(obj, 0) if pretty_lists else json.dumps(obj, indent=2, ensure_ascii=False)
    path.write_text(text + "\n", encoding="utf-8")


def round_sig(x: float, digits: int = 7) -> float:
    """Rounds to `digits` significant digits (keeps the golden files small)."""
    return float(f"{x:.{digits}g}")


def flat(t: Any, digits: int = 7) -> dict[str, Any]:
    """A tensor as {"shape": [...], "data": [row-major values]}, floats rounded."""
    import torch

    t = t.detach().to(torch.float64).cpu().contiguous()
    return {"shape": list(t.shape), "data": [round_sig(v, digits) for v in t.reshape(-1).tolist()]}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Collects Python warnings, transformers/tokenizers log records at WARNING or above and
    anything printed to stderr, so a caller can assert that loading was silent."""
    import transformers

    found: list[str] = []
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars are not warnings
    handler = _Collect()
    tf_logger = transformers.utils.logging.get_logger("transformers")
    old_level = tf_logger.level
    tf_logger.setLevel(logging.WARNING)
    tf_logger.addHandler(handler)
    stderr = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr):
            warnings.simplefilter("always")
            yield found
    finally:
        tf_logger.removeHandler(handler)
        tf_logger.setLevel(old_level)
    found.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    found.extend(handler.messages)
    found.extend(line for line in stderr.getvalue().splitlines() if line.strip())


def load_checked(folder: Path, dtype: Any = None) -> tuple[Any, Any]:
    """Loads a model folder with AutoModelForCausalLM.from_pretrained and its tokenizer.json with
    PreTrainedTokenizerFast(tokenizer_file=...); raises if either emits any warning."""
    import torch
    from transformers import AutoModelForCausalLM

    with collect_warnings() as found:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
        model.eval()
    if found:
        raise RuntimeError(f"loading {rel(folder)} warned:\n  " + "\n  ".join(found))
    with collect_warnings() as found:
        tok = tokenizer_from_file(folder)
    if found:
        raise RuntimeError(f"loading {rel(folder)}/tokenizer.json warned:\n  " + "\n  ".join(found))
    return model, tok


def tokenizer_from_file(folder: Path) -> Any:
    """The tokenizer exactly as tokenizer.json defines it (no class-specific rebuilding), with the
    special tokens named in tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)


def save_safetensors(path: Path, tensors: dict[str, Any]) -> None:
    """Writes tensors (contiguous, in their own dtype) with the metadata torch/transformers write."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
