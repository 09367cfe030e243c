"""Golden data for the optimizer (packages/core/test/golden/optim.json), from PyTorch and transformers.

Two sections:

- "adamw": ten steps of torch.optim.AdamW (defaults otherwise: amsgrad False, maximize False) on a
  few parameter tensors, with torch.nn.utils.clip_grad_norm_ before each step when maxNorm is set,
  and the learning rate of each step from a transformers schedule (LambdaLR) or constant. The same
  run is made twice from the same inputs: in float32 (what the GPU kernel must agree with) and in
  float64 (what the float64 reference must agree with to rounding). Recorded: each step's lr, the
  total gradient norm (before clipping) and the clip coefficient (none without maxNorm), the
  float32 parameters after steps 1, 5 and 10 and moments after steps 1 and 10, and the float64
  parameters and moments after step 10.
- "schedules": the learning rate that each transformers schedule gives optimizer step k = 0, 1, ...
  (LambdaLR: lr_k = base_lr * lr_lambda(k)), read from the optimizer's param group before each step.

Inputs are not stored: parameters and gradients are mulberry32 uniforms exactly as
packages/core/ref/check.ts randomArray(n, seed, scale) makes them, rounded to float32. (mulberry32
uses only 32-bit integer arithmetic and one division by 2^32, so Python reproduces it bit for bit;
the file carries checksums the tests compare first.)
  initial parameter of tensor i:         randomArray(size_i, initSeed + i, initScale)
  gradient of tensor i at step s (1..):  randomArray(size_i, gradSeed + 1000*s + i, gradScales[s-1])
Tensors are concatenated in order in every recorded array ("sizes" gives the split).

Run from the repository root: tools/.venv/bin/python tools/golden_optim.py (after
bash tools/setup-python.sh; any Python with torch works).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import torch
import transformers
from transformers import (
    get_constant_schedule,
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

OUT = pathlib.Path(__file__).resolve().parent.parent / "packages/core/test/golden/optim.json"
STEPS = 10
SNAPSHOT_PARAM = (1, 5, 10)
SNAPSHOT_MOMENTS = (1, 10)


def mulberry32(seed: int):
    """The generator of packages/core/ref/check.ts (rng), in 32-bit unsigned arithmetic."""
    s = seed & 0xFFFFFFFF

    def imul(a: int, b: int) -> int:
        return (a * b) & 0xFFFFFFFF

    def next_value() -> float:
        nonlocal s
        s = (s + 0x6D2B79F5) & 0xFFFFFFFF
        t = s
        t = imul(t ^ (t >> 15), t | 1)
        t ^= (t + imul(t ^ (t >> 7), t | 61)) & 0xFFFFFFFF
        return ((t ^ (t >> 14)) & 0xFFFFFFFF) / 4294967296

    return next_value


def random_f32(n: int, seed: int, scale: float) -> np.ndarray:
    """check.ts randomArray(n, seed, scale) rounded to float32: (2u - 1)*scale in double, then f32."""
    nxt = mulberry32(seed)
    return np.array([(2 * nxt() - 1) * scale for _ in range(n)], dtype=np.float64).astype(np.float32)


# Each case: tensor sizes, hyperparameters, the lr of each step, and the input generators.
CASES = [
    {
        "name": "defaults, no clipping",
        "sizes": [1, 7, 65, 300],
        "schedule": {"kind": "constant", "lr": 1e-3},
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weightDecay": 0.01,
        "maxNorm": None,
        "initSeed": 11,
        "initScale": 1.0,
        "gradSeed": 100,
        "gradScales": [1.0] * STEPS,
    },
    {
        # Total norm ~ 11*scale: clipping is active on most steps and inactive on steps 3 and 7.
        # Warmup from lr 0 at step 1.
        "name": "clipping active on most steps, linear warmup and decay",
        "sizes": [1, 7, 65, 300],
        "schedule": {"kind": "linear", "lr": 2e-3, "warmupSteps": 3, "totalSteps": STEPS},
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-6,
        "weightDecay": 0.1,
        "maxNorm": 1.0,
        "initSeed": 21,
        "initScale": 1.0,
        "gradSeed": 200,
        "gradScales": [1.0, 2.0, 0.05, 1.0, 0.5, 3.0, 0.01, 1.0, 1.0, 0.2],
    },
    {
        "name": "clipping never active, no weight decay",
        "sizes": [7, 65],
        "schedule": {"kind": "constant", "lr": 5e-4},
        "beta1": 0.8,
        "beta2": 0.99,
        "eps": 1e-8,
        "weightDecay": 0.0,
        "maxNorm": 100.0,
        "initSeed": 31,
        "initScale": 1.0,
        "gradSeed": 300,
        "gradScales": [1.0] * STEPS,
    },
    {
        # 1 - beta1 = 0.7 >= 0.5 takes torch.lerp's other branch; eps dominates sqrt(v); the norm
        # (~1e-3 * scale/1e-4) sits around maxNorm so the clip toggles; cosine warmup from lr 0.
        "name": "beta1 0.3, eps-dominated tiny gradients, clip near its threshold, cosine",
        "sizes": [1, 300],
        "schedule": {"kind": "cosine", "lr": 1e-2, "warmupSteps": 2, "totalSteps": STEPS, "numCycles": 0.5},
        "beta1": 0.3,
        "beta2": 0.9,
        "eps": 1e-3,
        "weightDecay": 0.05,
        "maxNorm": 1e-3,
        "initSeed": 41,
        "initScale": 0.1,
        "gradSeed": 400,
        "gradScales": [1e-4, 2e-4, 5e-5, 1e-4, 3e-4, 1e-4, 8e-5, 1.2e-4, 1e-4, 5e-5],
    },
]

SCHEDULES = [
    {"kind": "constant", "lr": 3e-4, "steps": 25},
    {"kind": "constant_with_warmup", "lr": 3e-4, "warmupSteps": 5, "steps": 25},
    {"kind": "constant_with_warmup", "lr": 1e-3, "warmupSteps": 0, "steps": 5},
    {"kind": "linear", "lr": 3e-4, "warmupSteps": 5, "totalSteps": 20, "steps": 25},
    {"kind": "linear", "lr": 2e-4, "warmupSteps": 0, "totalSteps": 25, "steps": 25},
    {"kind": "linear", "lr": 1e-3, "warmupSteps": 10, "totalSteps": 10, "steps": 13},
    {"kind": "cosine", "lr": 3e-4, "warmupSteps": 5, "totalSteps": 20, "numCycles": 0.5, "steps": 25},
    {"kind": "cosine", "lr": 1e-4, "warmupSteps": 0, "totalSteps": 25, "numCycles": 0.5, "steps": 25},
    {"kind": "cosine", "lr": 5e-4, "warmupSteps": 3, "totalSteps": 23, "numCycles": 1.0, "steps": 25},
]


def make_scheduler(optimizer, s: dict):
    kind = s["kind"]
    if kind == "constant":
        return get_constant_schedule(optimizer)
    if kind == "constant_with_warmup":
        return get_constant_schedule_with_warmup(optimizer, s["warmupSteps"])
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, s["warmupSteps"], s["totalSteps"])
    if kind == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, s["warmupSteps"], s["totalSteps"], s["numCycles"])
    raise ValueError(kind)


def inputs(case: dict):
    params = [random_f32(n, case["initSeed"] + i, case["initScale"]) for i, n in enumerate(case["sizes"])]
    grads = [
        [random_f32(n, case["gradSeed"] + 1000 * s + i, case["gradScales"][s - 1]) for i, n in enumerate(case["sizes"])]
        for s in range(1, STEPS + 1)
    ]
    return params, grads


def run(case: dict, dtype: torch.dtype):
    """Ten steps of clip_grad_norm_ (when maxNorm) + AdamW + scheduler.step(), as a training loop does."""
    params0, grads = inputs(case)
    params = [torch.nn.Parameter(torch.from_numpy(p.copy()).to(dtype)) for p in params0]
    opt = torch.optim.AdamW(
        params,
        lr=case["schedule"]["lr"],
        betas=(case["beta1"], case["beta2"]),
        eps=case["eps"],
        weight_decay=case["weightDecay"],
    )
    sched = make_scheduler(opt, case["schedule"])
    rec = {"lr": [], "norm": [], "coef": [], "snapshots": {}}
    for s in range(1, STEPS + 1):
        for p, g in zip(params, grads[s - 1], strict=True):
            p.grad = torch.from_numpy(g.copy()).to(dtype)
        if case["maxNorm"] is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, case["maxNorm"])
            coef = torch.clamp(case["maxNorm"] / (norm + 1e-6), max=1.0)  # what clip_grad_norm_ applied
            rec["coef"].append(float(coef))
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        rec["norm"].append(float(norm))
        rec["lr"].append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
        snap = {}
        if s in SNAPSHOT_PARAM:
            snap["param"] = flat([p.detach() for p in params])
        if s in SNAPSHOT_MOMENTS:
            snap["m"] = flat([opt.state[p]["exp_avg"] for p in params])
            snap["v"] = flat([opt.state[p]["exp_avg_sq"] for p in params])
        if snap:
            rec["snapshots"][str(s)] = snap
    return rec


def seq_sum(values) -> float:
    total = 0.0
    for v in values:
        total += float(v)
    return total


def flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().numpy().reshape(-1) for t in tensors])


def f32_list(a: np.ndarray) -> list[float]:
    # The shortest decimal that round-trips each float32 (Math.fround of it gives the value back).
    return [float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")")) for v in a.astype(np.float32)]


def f64_list(a: np.ndarray) -> list[float]:
    return [float(v) for v in a.astype(np.float64)]


def adamw_case(case: dict) -> dict:
    params0, grads = inputs(case)
    r32 = run(case, torch.float32)
    r64 = run(case, torch.float64)
    assert r32["lr"] == r64["lr"]
    out = {k: v for k, v in case.items()}
    out["steps"] = STEPS
    # Left-to-right float64 sums, in the order the TypeScript test adds them up.
    out["checksum"] = {
        "initSum": seq_sum(np.concatenate(params0)),
        "gradSum": seq_sum([seq_sum(np.concatenate(step)) for step in grads]),
        "firstGrad": float(grads[0][0][0]),
    }
    out["lr"] = r32["lr"]
    out["f32"] = {
        "norm": r32["norm"],
        "coef": r32["coef"],
        "snapshots": {
            k: {name: f32_list(arr) for name, arr in snap.items()} for k, snap in r32["snapshots"].items()
        },
    }
    last = r64["snapshots"][str(STEPS)]
    out["f64"] = {
        "norm": r64["norm"],
        "coef": r64["coef"],
        "final": {name: f64_list(last[name]) for name in ("param", "m", "v")},
    }
    return out


def schedule_case(s: dict) -> dict:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=s["lr"])
    sched = make_scheduler(opt, s)
    lrs = []
    for _ in range(s["steps"]):
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        sched.step()
    return {**s, "lrs": lrs}


def write(out: dict) -> None:
    # Indented structure, but each array of numbers on one line so the file stays small.
    arrays: list[list] = []

    def lift(o):
        if isinstance(o, dict):
            return {k: lift(v) for k, v in o.items()}
        if isinstance(o, list) and all(isinstance(v, (int, float)) or v is None for v in o):
            arrays.append(o)
            return f"@@{len(arrays) - 1}@@"
        if isinstance(o, list):
            return [lift(v) for v in o]
        return o

    text = json.dumps(lift(out), indent=1)
    text = re.sub(r'"@@(\d+)@@"', lambda m: json.dumps(arrays[int(m.group(1))], separators=(",", ":")), text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text + "\n")


def main() -> None:
    torch.set_num_threads(1)
    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "adamw": [adamw_case(c) for c in CASES],
        "schedules": [schedule_case(s) for s in SCHEDULES],
    }
    write(out)
    for c in out["adamw"]:
        n32 = ", ".join(f"{v:.3g}" for v in c["f32"]["norm"]) or "-"
        print(f"{c['name']}: lr {c['lr'][0]:.3g}..{c['lr'][-1]:.3g}, norms {n32}")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
