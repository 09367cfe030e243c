"""Golden data for LoRA dropout: one training step of PEFT (float32, CPU) whose lora_dropout
modules apply webtune's mask instead of torch's random one, so the loss and every LoRA gradient
can be compared exactly: packages/train/test/golden/dropout/<model>.json and .safetensors.

Run from the repository root (after `bash tools/setup-python.sh`):

    tools/.venv/bin/python tools/golden_dropout.py

The mask is webtune's (shaders/dropout.wgsl, packages/core/ref/dropout.ts), written again here in
numpy: keep(i) = hash(seed, step, micro-batch, module, i) >= round(p * 2^32), hash a chain of
lowbias32 mixes, i the element's index in the module's input [batch, seq, in] flattened, module the
adapted module's index in PEFT's module order (model order). Dropped elements are 0, kept ones
scaled by 1 / (1 - p): nn.Dropout's semantics with a known mask. Everything else as
golden_quant_train.py: the fixed batch (2 x 12), r 4, alpha 8, all-linear, rsLoRA, seeded A and B.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from golden_peft_train import init_weights, lora_modules, lora_params  # noqa: E402
from hf_common import REPO_ROOT, rel, save_safetensors, write_json  # noqa: E402
from peft_golden_common import (  # noqa: E402
    CONFIGS,
    MODELS,
    adapter_key,
    batch_tensors,
    collect_all_warnings,
    fixed_batch,
    load_base,
    reference_loss,
    scaling,
    set_deterministic,
)

OUT_DIR = REPO_ROOT / "packages/train/test/golden/dropout"
CONFIG = "Q"
CONFIGS[CONFIG] = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "targets_gpt2": "all-linear", "use_rslora": True}
P = 0.3
SEED, STEP, MICRO = 21, 3, 0
RUNS = ["tiny-qwen3", "tiny-gpt2"]
M32 = np.uint64(0xFFFFFFFF)


def mix32(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.uint64) & M32
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x7FEB352D)) & M32
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x846CA68B)) & M32
    h ^= h >> np.uint64(16)
    return h


def keep_mask(module: int, n: int) -> np.ndarray:
    h = mix32(np.array([SEED ^ 0x9E3779B9], dtype=np.uint64))
    for v in (STEP, MICRO, module):
        h = mix32(h ^ np.uint64(v))
    threshold = min(2**32 - 1, round(P * 2**32))
    return mix32(h ^ np.arange(n, dtype=np.uint64)) >= np.uint64(threshold)


def mask_dropout(module: int) -> Any:
    """A stand-in for PEFT's nn.Dropout(p) on one module: webtune's mask, scaled by 1/(1 - p)."""
    import torch

    class MaskDropout(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            keep = torch.from_numpy(keep_mask(module, x.numel()).reshape(x.shape))
            return torch.where(keep, x / (1 - P), torch.zeros_like(x))

    return MaskDropout()


def lora_config(model_type: str) -> Any:
    from peft import LoraConfig

    gpt2 = model_type == "gpt2"
    return LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=P, bias="none", use_rslora=True,
        fan_in_fan_out=gpt2, task_type="CAUSAL_LM",
    )


def main() -> None:
    from importlib.metadata import version

    import torch
    from peft import get_peft_model

    set_deterministic()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(RUNS):
        base, tok = load_base(name)
        batch = fixed_batch(name, tok, base.config.vocab_size)
        with collect_all_warnings() as found:
            pm = get_peft_model(base, lora_config(base.config.model_type))
        if found:
            raise SystemExit(f"{name}: get_peft_model warned: {found}")
        init = init_weights(pm, 7900 + i)
        for index, (_, m) in enumerate(lora_modules(pm)):
            if not isinstance(m.lora_dropout["default"], torch.nn.Dropout):
                raise SystemExit(f"{name}: module {index} has no nn.Dropout to replace")
            m.lora_dropout["default"] = mask_dropout(index)
        pm.train()
        x, y = batch_tensors(batch)
        out = pm(input_ids=x, labels=y)
        out.loss.backward()
        loss = out.loss.item()
        ref = float(reference_loss(out.logits.detach(), y))
        if abs(ref - loss) > 1e-6 * abs(ref):
            raise SystemExit(f"{name}: loss {loss} != mean CE {ref}")
        grads = {k: p.grad.detach().clone() for k, p in lora_params(pm).items()}
        modules = []
        for path, m in lora_modules(pm):
            key = adapter_key(f"{path}.lora_A.default.weight").removesuffix(".lora_A.weight")
            modules.append(
                {
                    "module": key.removeprefix("base_model.model."),
                    "key_prefix": key,
                    "in_features": int(m.in_features),
                    "out_features": int(m.out_features),
                    "r": int(m.r["default"]),
                    "scaling": float(m.scaling["default"]),
                }
            )
        tensors = {f"init.{k}": v for k, v in init.items()}
        tensors.update({f"grad.{k}": v for k, v in grads.items()})
        save_safetensors(OUT_DIR / f"{name}.safetensors", tensors)
        # The same step without dropout's effect on the loss would differ: record it to show the mask acts.
        write_json(
            OUT_DIR / f"{name}.json",
            {
                "model": name,
                "path": rel(MODELS[name][0]),
                "generated_by": {
                    "script": "tools/golden_dropout.py",
                    "torch": torch.__version__,
                    "transformers": version("transformers"),
                    "peft": version("peft"),
                },
                "dropout": {"p": P, "seed": SEED, "step": STEP, "micro": MICRO},
                "lora": {"scaling": scaling(CONFIG)},
                "batch": batch,
                "loss": loss,
                "modules": modules,
            },
        )
        print(f"{name:12} loss {loss:.6f}  {len(modules)} modules  {(OUT_DIR / f'{name}.safetensors').stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
