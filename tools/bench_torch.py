"""The PyTorch CPU baseline of `pnpm bench --suite models,train`.

bench/run.ts writes the case list (bench/cases.ts, with the very token ids the browser uses) to a
JSON spec, runs this script with the Python that tools/python.ts finds ($WEBTUNE_PYTHON, .venv,
tools/.venv or python3 on PATH), and merges the figures into its records by case key. Run by hand:

    tools/.venv/bin/python tools/bench_torch.py --spec spec.json --out torch.json

What is measured, on the CPU, in float32 (torch's default threads; weights read from the same
files webtune loads: stories260K in F32, the SmolLM2-135M-shaped model in F16, upcast):

- prefill: `model(input_ids, use_cache=True, logits_to_keep=1)` under inference_mode, i.e. the
  prompt's forward pass filling a fresh KV cache and the last position's logits (webtune's
  Generator prefill does the same work). Lower median over repetitions, after WARMUP_MIN untimed
  prefills.
- decode: after a prefill, greedy steps `model(next_id, past_key_values=cache)` + argmax; the
  figure is milliseconds per step over newTokens - 1 steps (as webtune's decodeSeconds covers).
  The greedy ids are returned so the driver can report how far both sides agree.
- train: transformers model wrapped by peft.get_peft_model(LoraConfig(r, lora_alpha,
  target_modules, lora_dropout=0, bias="none")), torch.optim.AdamW over the LoRA parameters
  (lr, betas, eps, weight_decay as the page), one step = forward with labels = input_ids ->
  loss.backward() -> clip_grad_norm_(1.0) -> optimizer.step() -> zero_grad(set_to_none=True), the
  same batch every step. Median step time after the warm-up steps (at least WARMUP_MIN warm-up and
  timed steps here, as torch's first steps are slow, see below).
  Memory, torch's own accounting on the CPU:
    persistent_bytes = bytes of every distinct storage of the model's parameters and buffers
      (frozen float32 weights, tied embedding counted once, LoRA A/B) plus AdamW's state;
    transient_peak_bytes = the peak of "Total Allocated" over the memory events of
      torch.profiler (profile_memory=True) during one extra, untimed step: bytes allocated by
      torch's CPU allocator during the step and not yet freed (activations, logits, gradients,
      temporaries);
    peak_bytes = persistent_bytes + transient_peak_bytes;
    rss_peak_delta = the process's VmHWM after the timed steps minus VmRSS before them (the peak
      is reset through /proc/self/clear_refs first; Linux only, else null).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any


# PyTorch's first steps on the CPU run several times slower than later ones (fresh allocations
# and page faults); its steps are cheap next to the browser's, so it always gets at least this
# many warm-up runs and timed runs, whatever the case asks of the page.
WARMUP_MIN = 3


def log(msg: str) -> None:
    print(f"[torch] {msg}", flush=True)


def median_low(xs: list[float]) -> float:
    return statistics.median_low(xs)


def timed_samples(run, min_samples: int, max_samples: int, budget_ms: float) -> list[float]:
    """Calls run() (which returns its own milliseconds) at least min_samples times, more while
    the budget lasts, at most max_samples."""
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_samples and (
        len(samples) < min_samples or (time.perf_counter() - start) * 1000 < budget_ms
    ):
        samples.append(run())
    return samples


def load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model


def storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def rss_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_inference(case: dict[str, Any], model) -> dict[str, Any]:
    import torch

    ids = torch.tensor([case["prompt_ids"]], dtype=torch.long)

    def prefill():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out, int(torch.argmax(out.logits[0, -1]))

    with torch.inference_mode():
        for _ in range(WARMUP_MIN):  # allocator and first-call paths
            prefill()
        if case["kind"] == "prefill":

            def once() -> float:
                t0 = time.perf_counter()
                prefill()
                return (time.perf_counter() - t0) * 1000

            samples = timed_samples(
                once, max(case["min_samples"], WARMUP_MIN), max(case["max_samples"], WARMUP_MIN), case["budget_ms"]
            )
            return {"ms": median_low(samples), "samples_ms": samples}

        n = case["new_tokens"]
        generated: list[int] = []

        def once() -> float:
            out, tok = prefill()
            cache = out.past_key_values
            toks = [tok]
            t0 = time.perf_counter()
            for _ in range(n - 1):
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                tok = int(torch.argmax(out.logits[0, -1]))
                toks.append(tok)
            ms = (time.perf_counter() - t0) * 1000 / max(1, n - 1)
            generated[:] = toks
            return ms

        samples = timed_samples(once, max(case["min_samples"], 2), max(case["max_samples"], 2), case["budget_ms"])
        return {"ms": median_low(samples), "samples_ms": samples, "ids": generated}


def profiled_transient_peak(step) -> int:
    """Peak bytes allocated (and not yet freed) by torch's CPU allocator during step()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and "args" in e]
    return max(totals) if totals else 0


def run_train(case: dict[str, Any], path: str) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    base = load_model(path)
    targets = case["targets"]
    config = LoraConfig(
        r=case["r"],
        lora_alpha=case["alpha"],
        target_modules=targets if isinstance(targets, str) else list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    h = case["hyper"]
    opt = torch.optim.AdamW(
        params, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"], weight_decay=h["weightDecay"]
    )
    ids = torch.tensor(case["ids"], dtype=torch.long).view(case["batch"], case["seq"])
    losses: list[float] = []

    def step() -> float:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, h["maxGradNorm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        return (time.perf_counter() - t0) * 1000

    first_ms = step()
    for _ in range(max(case["warmup_steps"], WARMUP_MIN) - 1):
        step()
    rss_before = rss_bytes("VmRSS") if reset_peak_rss() else None
    samples = timed_samples(
        step, max(case["min_steps"], WARMUP_MIN), max(case["max_steps"], WARMUP_MIN), case["budget_ms"]
    )
    hwm = rss_bytes("VmHWM")
    persistent = storage_bytes(
        [*model.parameters(), *model.buffers(), *(t for s in opt.state.values() for t in s.values() if torch.is_tensor(t))]
    )
    transient = profiled_transient_peak(step)
    trainable = sum(p.numel() for p in params)
    del model, base, opt
    return {
        "ms": median_low(samples),
        "samples_ms": samples,
        "first_step_ms": first_ms,
        "first_loss": losses[0],
        "trainable_params": trainable,
        "persistent_bytes": persistent,
        "transient_peak_bytes": transient,
        "peak_bytes": persistent + transient,
        "rss_peak_delta": (hwm - rss_before) if (rss_before is not None and hwm is not None) else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="JSON case list written by bench/run.ts")
    ap.add_argument("--out", required=True, help="where to write the results (JSON)")
    args = ap.parse_args()
    spec = json.loads(Path(args.spec).read_text())

    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    log(f"torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}, {env['threads']} threads")
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    loaded: dict[str, Any] = {}
    for case in spec.get("inference", []):
        try:
            if case["model"] not in loaded:
                loaded.clear()
                loaded[case["model"]] = load_model(spec["models"][case["model"]]).eval()
            results[case["key"]] = run_inference(case, loaded[case["model"]])
            log(f"{case['key']}: {results[case['key']]['ms']:.2f} ms")
        except Exception as e:  # noqa: BLE001 - reported per case, the others still run
            errors[case["key"]] = f"{type(e).__name__}: {e}"
            log(f"{case['key']}: failed: {errors[case['key']]}")
    loaded.clear()
    for case in spec.get("train", []):
        try:
            results[case["key"]] = run_train(case, spec["models"][case["model"]])
            r = results[case["key"]]
            log(f"{case['key']}: {r['ms']:.0f} ms/step, peak {r['peak_bytes'] / 2**20:.1f} MiB")
        except Exception as e:  # noqa: BLE001
            errors[case["key"]] = f"{type(e).__name__}: {e}"
            log(f"{case['key']}: failed: {errors[case['key']]}")
    Path(args.out).write_text(json.dumps({"env": env, "results": results, "errors": errors}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
