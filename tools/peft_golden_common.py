"""Helpers for the PEFT training golden data (tools/golden_peft_train.py): the models, the fixed
batch, the two LoRA configurations, silent loading of base models and adapters, and the loss.
Not a script: imported by golden_peft_train.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import FIXTURES_DIR, REPO_ROOT, STORIES_DIR, TINY_MODELS, collect_warnings, load_checked  # noqa: E402

GOLDEN_DIR = REPO_ROOT / "packages/train/test/golden/peft-train"
SEQ_LEN = 12
IGNORE = -100  # transformers' ignore_index

# Row 0 of each batch: the first SEQ_LEN ids of this text through the model's own tokenizer
# (its default special tokens, so the Llama/Qwen fixtures and stories260K start with <s>).
SENTENCES = {
    "stories": "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "tiny": "One day, a little dog named Max went to the big park to play with his ball.",
    "gpt2": "First Citizen:\nBefore we proceed any further, hear me speak. All: Speak, speak.",
}

# name -> (folder, sentence key, seed). The seed drives row 1 of the batch and the initial LoRA
# weights (see init_seed).
MODELS: dict[str, tuple[Path, str, int]] = {
    "stories260K": (STORIES_DIR, "stories", 9000),
    **{n: (FIXTURES_DIR / n, "gpt2" if n == "tiny-gpt2" else "tiny", 9001 + i) for i, n in enumerate(TINY_MODELS)},
}

# Labels: the batch's ids with these positions set to IGNORE. Row 0 loses two tokens in the middle;
# row 1 gets a prompt-like prefix (positions 0..4) that is not trained on. After the shift inside
# the model, position 0's label is never used, so 11 + 11 - 2 - 4 = 16 tokens are counted.
IGNORED_ROW0 = (4, 8)
PROMPT_LEN_ROW1 = 5

# The two LoRA configurations. "targets_gpt2" replaces "target_modules" for GPT-2, whose attention
# is one fused Conv1D (c_attn); GPT-2 also gets fan_in_fan_out = True (Conv1D stores [in, out]),
# which PEFT would otherwise set itself with a warning.
CONFIGS: dict[str, dict[str, Any]] = {
    "A": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "targets_gpt2": ["c_attn"],
        "use_rslora": False,
    },
    "B": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "targets_gpt2": "all-linear", "use_rslora": True},
}


def ensure_hash_seed() -> None:
    """PEFT expands target_modules = "all-linear" into a Python set, and save_pretrained writes it in
    set order, which depends on PYTHONHASHSEED. Re-executes this process with PYTHONHASHSEED=0 so
    that adapter_config.json is the same on every run."""
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def set_deterministic() -> None:
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


def lora_config(config_id: str, model_type: str) -> Any:
    """PEFT's LoraConfig for configuration A or B (dropout 0, bias none, default init, which the
    caller overwrites with seeded random values)."""
    from peft import LoraConfig

    c = CONFIGS[config_id]
    gpt2 = model_type == "gpt2"
    return LoraConfig(
        r=c["r"],
        lora_alpha=c["lora_alpha"],
        target_modules=c["targets_gpt2"] if gpt2 else c["target_modules"],
        lora_dropout=0.0,
        bias="none",
        use_rslora=c["use_rslora"],
        fan_in_fan_out=gpt2,
        task_type="CAUSAL_LM",
    )


def scaling(config_id: str) -> float:
    c = CONFIGS[config_id]
    return c["lora_alpha"] / (math.sqrt(c["r"]) if c["use_rslora"] else c["r"])


@contextlib.contextmanager
def collect_all_warnings() -> Iterator[list[str]]:
    """hf_common.collect_warnings (Python warnings, transformers' logger, stderr) plus PEFT's
    logger, so that loading an adapter can be required to be silent."""
    peft_logger = logging.getLogger("peft")
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(f"{record.name}: {record.getMessage()}")

    handler = _Collect(level=logging.WARNING)
    peft_logger.addHandler(handler)
    try:
        with collect_warnings() as found:
            yield found
    finally:
        peft_logger.removeHandler(handler)
    found.extend(records)


def load_base(name: str) -> tuple[Any, Any]:
    """The base model in float32 (eval mode) and its tokenizer; raises on any loading warning."""
    import torch

    folder = MODELS[name][0]
    model, tok = load_checked(folder, dtype=torch.float32)
    if model.loss_type is None:
        # GPT2LMHeadModel's class name matches no loss type; transformers would warn and fall back
        # to ForCausalLM on the first loss. Name it (the same loss).
        model.loss_type = "ForCausalLM"
    return model, tok


def fixed_batch(name: str, tok: Any, vocab: int) -> dict[str, Any]:
    """input_ids [2, SEQ_LEN]: row 0 a real sentence, row 1 seeded random ids with the largest id
    (vocab - 1) at position 6; labels = input_ids with IGNORED_ROW0 and row 1's prompt prefix set
    to IGNORE."""
    import torch

    _, sentence_key, seed = MODELS[name]
    text = SENTENCES[sentence_key]
    row0 = tok(text)["input_ids"][:SEQ_LEN]
    if len(row0) != SEQ_LEN:
        raise SystemExit(f"{name}: {text!r} gives only {len(row0)} tokens")
    gen = torch.Generator().manual_seed(seed)
    row1 = torch.randint(0, vocab, (SEQ_LEN,), generator=gen).tolist()
    row1[6] = vocab - 1
    labels0 = [IGNORE if i in IGNORED_ROW0 else t for i, t in enumerate(row0)]
    labels1 = [IGNORE if i < PROMPT_LEN_ROW1 else t for i, t in enumerate(row1)]
    counted = sum(1 for row in (labels0, labels1) for t in row[1:] if t != IGNORE)
    return {"text": text, "input_ids": [row0, row1], "labels": [labels0, labels1], "counted_tokens": counted}


def batch_tensors(batch: dict[str, Any]) -> tuple[Any, Any]:
    import torch

    return torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])


def reference_loss(logits: Any, labels: Any) -> Any:
    """transformers' causal-LM loss written out in float64 (differentiable): logits[:, t] predicts
    labels[:, t + 1]; mean of the cross-entropy over the positions whose label is not IGNORE.
    (transformers itself computes it in float32 even for float64 logits.)"""
    import torch

    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    mask = tgt != IGNORE
    nll = -lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return nll[mask].sum() / mask.sum()


def adapter_key(param_name: str, adapter: str = "default") -> str:
    """The key save_pretrained writes for a PEFT parameter name (the adapter name removed):
    base_model.model.x.q_proj.lora_A.default.weight -> base_model.model.x.q_proj.lora_A.weight"""
    marker = f".{adapter}."
    if marker not in param_name:
        raise ValueError(f"{param_name} has no adapter name {adapter!r}")
    return param_name.replace(marker, ".", 1)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
