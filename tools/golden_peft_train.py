"""Golden LoRA training data from PyTorch + transformers + PEFT (float32, CPU) for the TypeScript
trainer: packages/train/test/golden/peft-train/<model>-<config>/ for stories260K and each tiny-*
fixture, configurations A (r 4, alpha 8, q_proj/v_proj; GPT-2 c_attn) and B (r 8, alpha 16,
all-linear, rsLoRA). The folder's README.md documents every file and key.

Generate (from the repository root; any Python with torch, transformers, peft, safetensors):

    tools/.venv/bin/python tools/golden_peft_train.py          # or any Python with torch, transformers, peft

Per model and configuration, with the base model in float32, one torch thread, deterministic
algorithms and PYTHONHASHSEED=0 (set by re-executing itself):
1. a fixed batch (2 x 12 ids; row 0 a sentence through the model's tokenizer, row 1 seeded random
   ids) with labels = ids except a few -100 (row 1 has a 5-token prompt prefix);
2. seeded random initial lora_A / lora_B (B not zero, so the LoRA term changes the logits);
3. one step: the loss (transformers' semantics: shift inside the model, mean over the labels that
   are not -100) and every lora_A / lora_B gradient, checked here against float64 autograd (every
   entry) and float64 central finite differences (a few entries), errors printed;
4. ten steps of torch.optim.AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01) with
   get_linear_schedule_with_warmup(3, 10) and clip_grad_norm_(1.0), same batch every step: the
   loss before each update, the learning rate each update used, the gradient norm before clipping,
   and the final weights;
5. the trained adapter saved with save_pretrained (adapter/), reloaded with PeftModel.from_pretrained
   (must be silent and hold exactly the keys the model expects): its loss and row-0 logits.
Running it twice writes identical files.

Check an adapter folder (e.g. one exported by webtune) with PEFT on the same fixed batch:

    tools/.venv/bin/python tools/golden_peft_train.py --check-adapter <dir> --fixture <name> [--out <file.json>]

<name> is stories260K or tiny-llama, tiny-llama3, tiny-qwen2, tiny-qwen3, tiny-gpt2. It loads the
base model (float32) and PeftModel.from_pretrained(<dir>); any warning (Python, transformers, PEFT,
stderr), a missing, unexpected, mis-shaped or non-float32 tensor in adapter_model.safetensors is an
error (exit 1, reasons on stderr). Otherwise it prints (or writes to --out) the JSON
{"fixture", "adapter", "input_ids", "labels", "loss", "logits_row0": [12][vocab]}.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import rel, save_safetensors, write_json  # noqa: E402
from peft_golden_common import (  # noqa: E402
    CONFIGS,
    GOLDEN_DIR,
    MODELS,
    adapter_key,
    batch_tensors,
    collect_all_warnings,
    ensure_hash_seed,
    fixed_batch,
    load_base,
    lora_config,
    read_json,
    reference_loss,
    scaling,
    set_deterministic,
)

# Initial LoRA weights: A ~ N(0, 1) / sqrt(in_features) (about the scale of PEFT's Kaiming init),
# B ~ N(0, B_STD^2). B is not zero so that the first step's dA is not zero and the LoRA term
# changes the logits from the start.
B_STD = 0.05
# AdamW and the schedule. With 1e-3 the ten steps (the first has learning rate 0 under the
# warmup) lower the loss by 5-15 % with configuration A and 30-55 % with B, 0.5-10 % per step.
LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
WARMUP = 3
STEPS = 10
MAX_GRAD_NORM = 1.0
FD_STEP = 1e-5
# Tolerances of the self-checks (float32 goldens against float64 truth).
TOL_FD_VS_AUTOGRAD64 = 1e-6
TOL_GRAD32 = 1e-4

RUNS = [(name, cfg) for name in MODELS if name != "stories260K" for cfg in CONFIGS] + [("stories260K", "A")]


def lora_modules(pm: Any) -> list[tuple[str, Any]]:
    """(module path in the PEFT model, LoraLayer) in model order."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in pm.named_modules() if isinstance(m, LoraLayer)]


def lora_params(pm: Any) -> dict[str, Any]:
    """Saved-file key -> trainable parameter, in model order (all trainable parameters are LoRA)."""
    params = {adapter_key(n): p for n, p in pm.named_parameters() if p.requires_grad}
    if not params or any(".lora_A." not in k and ".lora_B." not in k for k in params):
        raise SystemExit(f"unexpected trainable parameters: {list(params)}")
    return params


def init_weights(pm: Any, seed: int) -> dict[str, Any]:
    """Writes seeded random A and B into every LoRA layer; returns key -> float32 copy."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(pm):
            a = m.lora_A["default"].weight  # [r, in]
            b = m.lora_B["default"].weight  # [out, r]
            a.copy_(torch.randn(a.shape, generator=gen, dtype=torch.float64) / math.sqrt(a.shape[1]))
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float64) * B_STD)
    return {k: p.detach().clone() for k, p in lora_params(pm).items()}


def build_peft(name: str, config_id: str, dtype: Any = None) -> tuple[Any, Any]:
    """Base model (float32 unless dtype) wrapped by get_peft_model, silently; returns (pm, tok)."""
    import torch
    from peft import get_peft_model

    base, tok = load_base(name)
    with collect_all_warnings() as found:
        pm = get_peft_model(base, lora_config(config_id, base.config.model_type))
    if found:
        raise SystemExit(f"{name}-{config_id}: get_peft_model warned:\n  " + "\n  ".join(found))
    if dtype is not None and dtype != torch.float32:
        pm = pm.to(dtype)
    return pm, tok


def set_weights(pm: Any, weights: dict[str, Any]) -> None:
    import torch

    params = lora_params(pm)
    if set(params) != set(weights):
        raise SystemExit("LoRA keys differ between models")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(weights[k])


def float64_rmsnorm(pm: Any) -> int:
    """transformers' RMSNorm casts its input to float32 (and back), which would make the float64
    model of the checks below only float32-accurate where it matters for finite differences.
    Replaces each RMSNorm's forward with the same formula in the input's dtype, after checking that
    both agree; returns how many were replaced."""
    import torch

    count = 0
    for m in pm.modules():
        if not type(m).__name__.endswith("RMSNorm"):
            continue

        def forward(self: Any, h: Any) -> Any:
            return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

        probe = torch.randn(3, m.weight.shape[0], generator=torch.Generator().manual_seed(1), dtype=m.weight.dtype)
        with torch.no_grad():
            original = m(probe)
            m.forward = types.MethodType(forward, m)
            if not torch.allclose(m(probe), original, rtol=1e-5, atol=1e-6):
                raise SystemExit(f"float64 RMSNorm disagrees with {type(m).__name__}")
        count += 1
    return count


def grad_checks(name: str, config_id: str, batch: dict, init: dict, grads32: dict, loss32: float) -> dict:
    """float64 truth for the float32 goldens: autograd in float64 on every entry, and central finite
    differences in float64 on the largest |grad| entry of A and B of the first and the last LoRA
    module. Raises when an error is over its tolerance; returns the errors."""
    import torch

    pm, _ = build_peft(name, config_id, dtype=torch.float64)
    patched = float64_rmsnorm(pm)
    pm.train()
    set_weights(pm, init)
    x, y = batch_tensors(batch)
    params = lora_params(pm)
    loss = reference_loss(pm(input_ids=x).logits, y)
    loss.backward()
    g64 = {k: p.grad.detach().clone() for k, p in params.items()}
    loss_rel = abs(loss32 - loss.item()) / abs(loss.item())
    # Whole-tensor error of the float32 gradients: |g32 - g64| / max|g64| over each tensor.
    grad_rel = max(float((grads32[k].double() - g64[k]).abs().max() / g64[k].abs().max()) for k in g64)

    def loss_at() -> float:
        with torch.no_grad():
            return float(reference_loss(pm(input_ids=x).logits, y))

    keys = list(params)
    modules = [keys[0].rsplit(".lora_", 1)[0], keys[-1].rsplit(".lora_", 1)[0]]
    fd = []
    for mod in modules:
        for ab in ("lora_A", "lora_B"):
            k = f"{mod}.{ab}.weight"
            idx = tuple(int(i) for i in torch.unravel_index(g64[k].abs().argmax(), g64[k].shape))
            p = params[k]
            with torch.no_grad():
                orig = float(p[idx])
                p[idx] = orig + FD_STEP
                up = loss_at()
                p[idx] = orig - FD_STEP
                down = loss_at()
                p[idx] = orig
            d = (up - down) / (2 * FD_STEP)
            fd.append(
                {
                    "key": k,
                    "index": list(idx),
                    "finite_difference": d,
                    "rel_err_autograd64": abs(float(g64[k][idx]) - d) / abs(d),
                    "rel_err_golden32": abs(float(grads32[k][idx]) - d) / abs(d),
                }
            )
    worst_fd = max(e["rel_err_autograd64"] for e in fd)
    worst_fd32 = max(e["rel_err_golden32"] for e in fd)
    problems = []
    if worst_fd > TOL_FD_VS_AUTOGRAD64:
        problems.append(f"finite differences vs float64 autograd: {worst_fd:.2e}")
    if max(worst_fd32, grad_rel, loss_rel) > TOL_GRAD32:
        problems.append(f"float32 goldens vs float64: grad {grad_rel:.2e}, fd {worst_fd32:.2e}, loss {loss_rel:.2e}")
    if problems:
        raise SystemExit(f"{name}-{config_id}: " + "; ".join(problems))
    return {
        "float64_rmsnorm_modules": patched,
        "loss_float64": loss.item(),
        "loss_rel_err": loss_rel,
        "grad_max_rel_err_vs_float64": grad_rel,
        "finite_differences": fd,
    }


def strict_load_adapter(name: str, adapter_dir: Path) -> tuple[Any, list[str]]:
    """Base model + PeftModel.from_pretrained(adapter_dir). Returns (model, problems): an exception
    PEFT raised (model None), every warning while loading, and every key of
    adapter_model.safetensors that is missing from the model, unexpected, of another shape or not
    float32 (PEFT itself only warns about missing keys)."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    base, _ = load_base(name)
    try:
        with collect_all_warnings() as found:
            pm = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as e:  # e.g. a size mismatch: PEFT raises from load_state_dict
        return None, [f"PeftModel.from_pretrained raised {type(e).__name__}: {e}"]
    problems = [f"warning while loading: {w}" for w in found]
    expected = get_peft_model_state_dict(pm)
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    problems += [f"missing key {k} {list(v.shape)}" for k, v in expected.items() if k not in stored]
    problems += [f"unexpected key {k} {list(v.shape)}" for k, v in stored.items() if k not in expected]
    for k, v in stored.items():
        if k not in expected:
            continue
        if v.shape != expected[k].shape:
            problems.append(f"{k}: shape {list(v.shape)} in the file, {list(expected[k].shape)} in the model")
        elif v.dtype != torch.float32:
            problems.append(f"{k}: dtype {v.dtype} (save_pretrained writes float32)")
        elif not torch.equal(v, expected[k]):
            problems.append(f"{k}: the model does not hold the file's values")
    pm.eval()
    return pm, problems


def eval_loss_logits(pm: Any, batch: dict) -> tuple[float, Any]:
    import torch

    x, y = batch_tensors(batch)
    with torch.no_grad():
        out = pm(input_ids=x, labels=y)
    return float(out.loss), out.logits


def golden(name: str, config_id: str, seed: int) -> tuple[dict, dict]:
    import peft
    import torch
    import transformers
    from transformers import get_linear_schedule_with_warmup

    pm, tok = build_peft(name, config_id)
    cfg = pm.base_model.model.config
    batch = fixed_batch(name, tok, cfg.vocab_size)
    x, y = batch_tensors(batch)

    # The base model alone, then with the initial LoRA weights (eval mode, no grad).
    with pm.disable_adapter():
        loss_base, logits_base = eval_loss_logits(pm, batch)
    init = init_weights(pm, seed)
    loss_init_eval, logits_init = eval_loss_logits(pm, batch)

    # 3. One step from the initial weights (train mode; every dropout is 0).
    pm.train()
    params = lora_params(pm)
    out = pm(input_ids=x, labels=y)
    out.loss.backward()
    loss = out.loss.item()
    if loss != loss_init_eval:
        raise SystemExit(f"{name}-{config_id}: train-mode loss {loss} != eval-mode loss {loss_init_eval}")
    ref = float(reference_loss(out.logits.detach(), y))
    if abs(ref - loss) > 1e-6 * abs(ref):
        raise SystemExit(f"{name}-{config_id}: loss {loss} != mean CE over counted tokens {ref}")
    grads = {k: p.grad.detach().clone() for k, p in params.items()}
    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))
    checks = grad_checks(name, config_id, batch, init, grads, loss)

    # 4. Ten AdamW steps from the same initial weights.
    set_weights(pm, init)
    pm.zero_grad(set_to_none=True)
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=WARMUP, num_training_steps=STEPS)
    losses, lrs, norms = [], [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        step_loss = pm(input_ids=x, labels=y).loss
        step_loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(plist, max_norm=MAX_GRAD_NORM)))
        losses.append(step_loss.item())
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    if losses[0] != loss or abs(norms[0] - grad_norm) > 1e-6 * grad_norm:
        raise SystemExit(f"{name}-{config_id}: step 0 differs from the single step")
    final = {k: p.detach().clone() for k, p in params.items()}
    pm.eval()
    loss_final, logits_final = eval_loss_logits(pm, batch)

    # 5. save_pretrained, then PEFT's own loader on a fresh base model.
    out_dir = GOLDEN_DIR / f"{name}-{config_id}"
    adapter_dir = out_dir / "adapter"
    pm.peft_config["default"].base_model_name_or_path = rel(MODELS[name][0])  # not this machine's path
    if out_dir.exists():
        shutil.rmtree(out_dir)  # no stale files from an earlier layout
    pm.save_pretrained(str(adapter_dir))
    # save_pretrained also writes a model card (README.md) naming this machine's path; PEFT's
    # loader reads only the two files below.
    (adapter_dir / "README.md").unlink(missing_ok=True)
    if sorted(p.name for p in adapter_dir.iterdir()) != ["adapter_config.json", "adapter_model.safetensors"]:
        raise SystemExit(f"{rel(adapter_dir)}: unexpected files {sorted(p.name for p in adapter_dir.iterdir())}")
    loaded, problems = strict_load_adapter(name, adapter_dir)
    if problems:
        raise SystemExit(f"{name}-{config_id}: PEFT reloads its own adapter with problems:\n  " + "\n  ".join(problems))
    loss_adapter, logits_adapter = eval_loss_logits(loaded, batch)
    if abs(loss_adapter - loss_final) > 1e-6 * loss_final:
        raise SystemExit(f"{name}-{config_id}: reloaded adapter loss {loss_adapter} != {loss_final}")

    tensors: dict[str, Any] = {}
    tensors.update(init)
    tensors.update({f"grad.{k}": v for k, v in grads.items()})
    tensors.update({f"final.{k}": v for k, v in final.items()})
    tensors["logits_row0.init"] = logits_init[0]
    tensors["logits_row0.adapter"] = logits_adapter[0]
    if any(v.dtype != torch.float32 for v in tensors.values()):
        raise SystemExit("non-float32 golden tensor")
    save_safetensors(out_dir / "tensors.safetensors", tensors)

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
    c = CONFIGS[config_id]
    lc = pm.peft_config["default"]
    record = {
        "model": name,
        "config": config_id,
        "path": rel(MODELS[name][0]),
        "generated_by": {
            "script": "tools/golden_peft_train.py",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "dtype": "float32",
        },
        "architecture": cfg.architectures[0],
        "lora": {
            "r": c["r"],
            "lora_alpha": c["lora_alpha"],
            "target_modules": c["targets_gpt2"] if cfg.model_type == "gpt2" else c["target_modules"],
            "target_modules_resolved": sorted(lc.target_modules),
            "lora_dropout": 0.0,
            "use_rslora": c["use_rslora"],
            "fan_in_fan_out": bool(lc.fan_in_fan_out),
            "bias": "none",
            "scaling": scaling(config_id),
        },
        "init": {
            "seed": seed,
            "lora_A": "torch.randn(generator) / sqrt(in_features), float64 then rounded to float32",
            "lora_B": f"torch.randn(generator) * {B_STD}",
            "order": "module order; A then B of each module, one torch.Generator",
        },
        "batch": batch,
        "loss_without_lora": loss_base,
        "loss": loss,
        "grad_norm": grad_norm,
        "logits_row0_max_abs_change_from_lora": float((logits_init[0] - logits_base[0]).abs().max()),
        "train": {
            "optimizer": {
                "name": "torch.optim.AdamW",
                "lr": LR,
                "betas": list(BETAS),
                "eps": EPS,
                "weight_decay": WEIGHT_DECAY,
            },
            "schedule": {
                "name": "get_linear_schedule_with_warmup",
                "num_warmup_steps": WARMUP,
                "num_training_steps": STEPS,
            },
            "max_grad_norm": MAX_GRAD_NORM,
            "steps": STEPS,
            "losses": losses,
            "lrs": lrs,
            "grad_norms": norms,
            "final_loss": loss_final,
        },
        "adapter": {"dir": "adapter", "loss": loss_adapter},
        "tensors": {
            "file": "tensors.safetensors",
            "initial": "<key>",
            "gradient": "grad.<key>",
            "final": "final.<key>",
            "logits_row0_initial": "logits_row0.init",
            "logits_row0_adapter": "logits_row0.adapter",
        },
        "modules": modules,
        "checks": checks,
    }
    write_json(out_dir / "golden.json", record)
    return record, checks


def check_adapter(adapter_dir: Path, name: str, out: Path | None) -> int:
    if name not in MODELS:
        print(f"unknown fixture {name!r}; one of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / "adapter_model.safetensors").is_file():
        print(f"{adapter_dir}: needs adapter_config.json and adapter_model.safetensors", file=sys.stderr)
        return 2
    pm, problems = strict_load_adapter(name, adapter_dir)
    if problems:
        print(f"{adapter_dir} does not load cleanly in PEFT:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    batch = fixed_batch(name, load_base(name)[1], pm.base_model.model.config.vocab_size)
    golden_file = GOLDEN_DIR / f"{name}-A" / "golden.json"
    if golden_file.is_file():
        stored = read_json(golden_file)["batch"]
        if stored["input_ids"] != batch["input_ids"] or stored["labels"] != batch["labels"]:
            print(f"the fixed batch differs from {rel(golden_file)}", file=sys.stderr)
            return 1
    loss, logits = eval_loss_logits(pm, batch)
    result = {
        "fixture": name,
        "adapter": str(adapter_dir),
        "input_ids": batch["input_ids"],
        "labels": batch["labels"],
        "loss": loss,
        "logits_row0": logits[0].tolist(),
    }
    text = json.dumps(result)
    if out is None:
        print(text)
    else:
        out.write_text(text + "\n", encoding="utf-8")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-adapter", type=Path, help="adapter folder to load with PEFT and evaluate")
    ap.add_argument("--fixture", help="base model for --check-adapter: " + ", ".join(MODELS))
    ap.add_argument("--out", type=Path, help="with --check-adapter: write the JSON here instead of stdout")
    args = ap.parse_args()
    ensure_hash_seed()
    set_deterministic()
    if args.check_adapter is not None:
        if args.fixture is None:
            ap.error("--check-adapter needs --fixture")
        sys.exit(check_adapter(args.check_adapter, args.fixture, args.out))
    if args.fixture is not None or args.out is not None:
        ap.error("--fixture/--out only go with --check-adapter")

    rows = []
    for name, config_id in RUNS:
        seed = MODELS[name][2] * 10 + (ord(config_id) - ord("A"))
        rec, checks = golden(name, config_id, seed)
        rows.append((f"{name}-{config_id}", rec, checks))
    print(f"{'run':15} {'modules':>7} {'base loss':>9} {'loss':>9} {'final':>9} {'adapter':>9} "
          f"{'|g| 0':>8} {'|g| 9':>8} {'g32 err':>8} {'fd err64':>8} {'fd err32':>8}")
    for run, rec, ch in rows:
        t = rec["train"]
        fd64 = max(e["rel_err_autograd64"] for e in ch["finite_differences"])
        fd32 = max(e["rel_err_golden32"] for e in ch["finite_differences"])
        print(f"{run:15} {len(rec['modules']):7} {rec['loss_without_lora']:9.5f} {rec['loss']:9.5f} "
              f"{t['final_loss']:9.5f} {rec['adapter']['loss']:9.5f} "
              f"{t['grad_norms'][0]:8.4f} {t['grad_norms'][-1]:8.4f} "
              f"{ch['grad_max_rel_err_vs_float64']:8.1e} {fd64:8.1e} {fd32:8.1e}")
    for run, rec, _ in rows:
        print(f"{run:15} losses {' '.join(f'{v:.5f}' for v in rec['train']['losses'])}")
    total = sum(f.stat().st_size for f in GOLDEN_DIR.rglob("*") if f.is_file())
    print(f"{rel(GOLDEN_DIR)}: {total:,} bytes")


if __name__ == "__main__":
    main()
