"""Golden LoRA configurations from Hugging Face PEFT (0.21) for packages/train/test/lora-*.cpu.test.ts.

Run from the repository root:

    tools/.venv/bin/python tools/golden_peft_config.py

For each tiny fixture model (packages/models/test/fixtures/tiny-*), loaded with transformers in float32,
writes packages/train/test/golden/peft-config/<model>.json holding:
  modules   the model's named_modules() (root excluded, in order): name, class, kind (linear, conv1d,
            embedding, lm_head = the output embedding, other), in/out features, layer index
  configs   at least 10 LoraConfigs (kwargs as JSON) and, for each, what get_peft_model made of them:
            the adapted modules in order with r, lora_alpha, scaling and the lora_A / lora_B shapes,
            fan_in_fan_out after injection, the warnings PEFT raised, the adapter_config.json text
            that save_pretrained wrote (see "target_modules order" below) and the keys, dtypes and
            shapes of adapter_model.safetensors in file order
  errors    configurations PEFT refuses (nothing matched, layers_to_transform with a regex, ...):
            the exception class and message
and one saved adapter per model in packages/train/test/golden/peft-config/adapters/<model>/
(adapter_config.json + adapter_model.safetensors exactly as save_pretrained wrote them, README.md
removed; A and B filled with seeded normal values so the file holds more than zeros).

Also writes:
  init.json         statistics of PEFT's initialisation of one large layer (in 1024, out 512,
                    r 32) for init_lora_weights True, "gaussian" and False
  python-json.json  Python's json.dumps of floats, strings and a nested object (indent 2,
                    sort_keys), the text conventions of adapter_config.json

target_modules order: PEFT keeps target_modules in a Python set, so the order of the list in
adapter_config.json follows string hashes and changes from one interpreter to the next. The goldens
hold the text PEFT wrote with that one list sorted (the script checks that the text is otherwise
unchanged by json.loads + sort + json.dumps); webtune writes the sorted order. The script re-runs
itself with PYTHONHASHSEED=0 so that the saved fixture adapters do not change between runs.

Checking an adapter folder written by webtune (or anyone) with PEFT:

    tools/.venv/bin/python tools/golden_peft_config.py --check-adapter DIR --model tiny-llama

loads the fixture model, then PeftModel.from_pretrained(model, DIR), and prints as JSON every
warning PEFT raised, each LoRA layer's r, lora_alpha and scaling, and the largest difference between
the loaded A/B values and the file's; exits 1 when PEFT warned or a value differs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import FIXTURES_DIR, REPO_ROOT, TINY_MODELS, rel, write_json  # noqa: E402

OUT = REPO_ROOT / "packages/train/test/golden/peft-config"
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def module_kind(model: Any, module: Any) -> str:
    import torch
    from transformers.pytorch_utils import Conv1D

    if module is model.get_output_embeddings():
        return "lm_head"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    return "other"


def module_list(model: Any) -> list[dict[str, Any]]:
    import torch
    from transformers.pytorch_utils import Conv1D

    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        entry: dict[str, Any] = {"name": name, "class": type(module).__name__, "kind": module_kind(model, module)}
        if isinstance(module, torch.nn.Linear):
            entry["in"], entry["out"] = module.in_features, module.out_features
        elif isinstance(module, Conv1D):
            entry["in"], entry["out"] = module.weight.shape[0], module.weight.shape[1]
        elif isinstance(module, torch.nn.Embedding):
            entry["in"], entry["out"] = module.num_embeddings, module.embedding_dim
        m = re.search(r"\.(?:layers|h)\.(\d+)(?:\.|$)", name)
        if m:
            entry["layer"] = int(m.group(1))
        out.append(entry)
    return out


def all_suffixes(names: list[str]) -> list[str]:
    """Every dotted suffix of every name, in a stable order (a target list of 20+ entries)."""
    seen: list[str] = []
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            s = ".".join(parts[i:])
            if s not in seen:
                seen.append(s)
    return seen


def configs_for(family: str, layers: int, linear_names: list[str]) -> list[tuple[str, dict[str, Any]]]:
    last = layers - 1
    C = "CAUSAL_LM"
    if family == "llama":
        return [
            ("defaults", {"task_type": C}),
            ("qv-r4", {"task_type": C, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
            ("suffix-list", {"task_type": C, "r": 4, "lora_alpha": 16,
                             "target_modules": ["self_attn.k_proj", "mlp.down_proj", "model.layers.0.self_attn.o_proj"]}),
            ("regex", {"task_type": C, "r": 6, "lora_alpha": 12, "target_modules": r".*\.(q|k)_proj"}),
            ("regex-named-group", {"task_type": C, "r": 3, "lora_alpha": 6,
                                   "target_modules": r"model\.layers\.(?P<i>[0-9]+)\.mlp\.(gate|up)_proj"}),
            ("all-linear-rslora", {"task_type": C, "r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                                   "use_rslora": True}),
            ("patterns", {"task_type": C, "r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                          "rank_pattern": {"q_proj": 2, "self_attn.q_proj": 6, "layers.1.mlp.up_proj": 5, "nomatch_proj": 3},
                          "alpha_pattern": {"v_proj": 3, "^model.layers.0.self_attn.o_proj": 5.5, r"mlp\..*_proj": 10}}),
            ("layers-list", {"task_type": C, "r": 4, "lora_alpha": 8,
                             "target_modules": ["q_proj", "v_proj", "up_proj", "model.layers.1.self_attn.k_proj"],
                             "layers_to_transform": [0, last]}),
            ("layers-int-pattern", {"task_type": C, "r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"],
                                    "layers_to_transform": 1, "layers_pattern": "layers"}),
            ("layers-pattern-list", {"task_type": C, "r": 2, "lora_alpha": 4, "target_modules": ["gate_proj"],
                                     "layers_to_transform": [0], "layers_pattern": ["h", "layers"]}),
            ("gaussian-rslora-dropout", {"task_type": C, "r": 16, "lora_alpha": 32, "use_rslora": True,
                                         "init_lora_weights": "gaussian", "lora_dropout": 0.05,
                                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
            ("init-false-float-alpha", {"task_type": C, "r": 2, "lora_alpha": 3.5, "init_lora_weights": False,
                                        "lora_dropout": 0.1, "target_modules": ["down_proj"]}),
            ("many-targets", {"task_type": C, "r": 4, "lora_alpha": 8, "target_modules": all_suffixes(linear_names)}),
            ("no-task-type", {"r": 4, "lora_alpha": 8, "target_modules": ["v_proj"]}),
            ("fan-in-fan-out-given", {"task_type": C, "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                      "fan_in_fan_out": True}),
        ]
    return [
        ("defaults", {"task_type": C}),
        ("c_attn-r4", {"task_type": C, "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}),
        ("suffix-list", {"task_type": C, "r": 4, "lora_alpha": 16,
                         "target_modules": ["attn.c_proj", "h.1.mlp.c_fc", "transformer.h.0.mlp.c_proj"]}),
        ("regex", {"task_type": C, "r": 6, "lora_alpha": 12, "target_modules": r".*\.h\.1\..*c_(attn|fc)"}),
        ("regex-named-group", {"task_type": C, "r": 3, "lora_alpha": 6,
                               "target_modules": r"transformer\.h\.(?P<i>\d+)\.mlp\.c_(fc|proj)"}),
        ("all-linear-rslora", {"task_type": C, "r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                               "use_rslora": True}),
        ("patterns", {"task_type": C, "r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                      "rank_pattern": {"c_attn": 2, "attn.c_attn": 6, "h.1.mlp.c_proj": 5, "nomatch": 3},
                      "alpha_pattern": {"c_proj": 3, "^transformer.h.0.mlp.c_fc": 5.5}}),
        ("layers-list", {"task_type": C, "r": 4, "lora_alpha": 8,
                         "target_modules": ["c_attn", "c_fc", "transformer.h.0.mlp.c_proj"],
                         "layers_to_transform": [last]}),
        ("layers-int-pattern", {"task_type": C, "r": 4, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj"],
                                "layers_to_transform": 0, "layers_pattern": "h"}),
        ("layers-pattern-list", {"task_type": C, "r": 2, "lora_alpha": 4, "target_modules": ["c_proj"],
                                 "layers_to_transform": [1], "layers_pattern": ["layers", "h"]}),
        ("gaussian-rslora-dropout", {"task_type": C, "r": 16, "lora_alpha": 32, "use_rslora": True,
                                     "init_lora_weights": "gaussian", "lora_dropout": 0.05,
                                     "target_modules": ["c_attn", "c_proj"]}),
        ("init-false-float-alpha", {"task_type": C, "r": 2, "lora_alpha": 3.5, "init_lora_weights": False,
                                    "lora_dropout": 0.1, "target_modules": ["mlp.c_proj"]}),
        ("many-targets", {"task_type": C, "r": 4, "lora_alpha": 8, "target_modules": all_suffixes(linear_names)}),
        ("no-task-type", {"r": 4, "lora_alpha": 8, "target_modules": ["c_fc"]}),
        ("fan-in-fan-out-given", {"task_type": C, "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
                                  "fan_in_fan_out": True}),
    ]


def error_cases(family: str) -> list[tuple[str, dict[str, Any]]]:
    C = "CAUSAL_LM"
    q = "q_proj" if family == "llama" else "c_attn"
    container = "layers" if family == "llama" else "h"
    return [
        ("no-match-list", {"task_type": C, "target_modules": ["nonexistent_proj"]}),
        ("no-match-regex", {"task_type": C, "target_modules": r"foo\..*"}),
        ("no-match-layers", {"task_type": C, "target_modules": [q], "layers_to_transform": [7]}),
        ("no-match-layers-pattern", {"task_type": C, "target_modules": [q], "layers_to_transform": [7],
                                     "layers_pattern": container}),
        ("no-match-layers-int", {"task_type": C, "target_modules": [q], "layers_to_transform": 9}),
        ("unsupported-module", {"task_type": C, "target_modules": ["mlp"]}),
        ("regex-with-layers", {"task_type": C, "target_modules": ".*proj", "layers_to_transform": [0]}),
        ("all-linear-with-layers", {"task_type": C, "target_modules": "all-linear", "layers_to_transform": [0]}),
        ("pattern-without-layers", {"task_type": C, "target_modules": [q], "layers_pattern": container}),
        ("empty-target-list", {"task_type": C, "target_modules": []}),
        ("zero-rank", {"task_type": C, "r": 0, "target_modules": [q]}),
    ]


def safetensors_keys(path: Path) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [{"key": k, "dtype": v["dtype"], "shape": v["shape"]} for k, v in entries], meta


def normalized_config_text(text: str) -> str:
    """The text with target_modules sorted when it is a list; checks nothing else changes."""
    obj = json.loads(text)
    if json.dumps(obj, indent=2, sort_keys=True) != text:
        raise SystemExit("adapter_config.json is not json.dumps(indent=2, sort_keys=True) of its own content")
    if isinstance(obj.get("target_modules"), list):
        obj["target_modules"] = sorted(obj["target_modules"])
    return json.dumps(obj, indent=2, sort_keys=True)


def apply(base: Any, kwargs: dict[str, Any]) -> tuple[Any, list[str]]:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**copy.deepcopy(kwargs)))
    return model, [f"{w.category.__name__}: {w.message}" for w in caught]


def adapted_modules(model: Any) -> list[dict[str, Any]]:
    from peft.tuners.lora import LoraLayer

    out = []
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out.append({
                "name": name.removeprefix(prefix),
                "r": module.r["default"],
                "alpha": module.lora_alpha["default"],
                "scaling": module.scaling["default"],
                "lora_A": list(module.lora_A["default"].weight.shape),
                "lora_B": list(module.lora_B["default"].weight.shape),
            })
    return out


def run_config(base: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    model, warns = apply(base, kwargs)
    config = model.peft_config["default"]
    tmp = Path(tempfile.mkdtemp())
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.save_pretrained(tmp)
        text = (tmp / "adapter_config.json").read_text()
        keys, meta = safetensors_keys(tmp / "adapter_model.safetensors")
    finally:
        shutil.rmtree(tmp)
    return {
        "adapted": adapted_modules(model),
        "fan_in_fan_out": config.fan_in_fan_out,
        "warnings": warns,
        "save_warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "adapter_config": normalized_config_text(text),
        "safetensors_metadata": meta,
        "safetensors": keys,
    }


def run_error(base: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    try:
        apply(base, kwargs)
    except Exception as error:  # noqa: BLE001 - the golden records whatever PEFT raises
        return {"error": type(error).__name__, "message": str(error)}
    raise SystemExit(f"PEFT accepted {kwargs}")


FIXTURE_CONFIG = {
    "tiny-llama": "patterns",
    "tiny-llama3": "all-linear-rslora",
    "tiny-qwen2": "qv-r4",
    "tiny-qwen3": "gaussian-rslora-dropout",
    "tiny-gpt2": "defaults",
}


def save_fixture(base: Any, name: str, kwargs: dict[str, Any], seed: int) -> None:
    import torch

    model, _ = apply(base, kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    path = OUT / "adapters" / name
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path)
    (path / "README.md").unlink(missing_ok=True)


def model_golden(name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    folder = FIXTURES_DIR / name
    base_name = rel(folder)  # relative to the repository root: the cwd of this script
    base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    cfg = json.loads((folder / "config.json").read_text())
    family = "gpt2" if cfg["model_type"] == "gpt2" else "llama"
    modules = module_list(base)
    linear_names = [m["name"] for m in modules if m["kind"] in ("linear", "conv1d")]
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    configs = []
    for cname, kwargs in configs_for(family, layers, linear_names):
        configs.append({"name": cname, "kwargs": kwargs, **run_config(base, kwargs)})
    errors = [{"name": ename, "kwargs": kwargs, **run_error(base, kwargs)} for ename, kwargs in error_cases(family)]
    fixture = FIXTURE_CONFIG[name]
    save_fixture(base, name, dict(configs_for(family, layers, linear_names))[fixture], seed=4242)
    write_json(OUT / f"{name}.json", {
        "model": name,
        "model_type": cfg["model_type"],
        "architectures": cfg["architectures"],
        "base_model_name_or_path": base_name,
        "fixture_adapter": {"folder": f"adapters/{name}", "config": fixture},
        "modules": modules,
        "configs": configs,
        "errors": errors,
    })
    print(f"{name}: {len(modules)} modules, {len(configs)} configs, {len(errors)} errors, fixture {fixture}")


def init_golden() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(1024, 512, bias=False)

    def stats(t: Any) -> dict[str, float]:
        t = t.detach().double().reshape(-1)
        return {"count": t.numel(), "min": t.min().item(), "max": t.max().item(), "mean": t.mean().item(),
                "std": t.std(unbiased=False).item()}

    out = {"in": 1024, "out": 512, "r": 32, "modes": []}
    for init in (True, "gaussian", False):
        torch.manual_seed(7)
        model = get_peft_model(Net(), LoraConfig(r=32, lora_alpha=32, target_modules=["proj"], init_lora_weights=init))
        layer = model.base_model.model.proj
        out["modes"].append({
            "init_lora_weights": init,
            "A": stats(layer.lora_A["default"].weight),
            "B": stats(layer.lora_B["default"].weight),
        })
    write_json(OUT / "init.json", out)


def python_json_golden() -> None:
    floats = [0.0, -0.0, 1.0, 0.05, 0.1, 1e-05, 0.0001, 0.001, 1e-4 * 0.99, 3.5, 16.0, 1e16, 1e15, 123456789012345.6,
              1234567890123456.8, 1e21, 1e22, 2.5e-7, 5e-324, 1.7976931348623157e308, 22.627416997969522,
              16 * math.sqrt(8), 8 * math.sqrt(4), 1 / 3, 100.0, 1e100, 12345678.9, 0.5]
    strings = ["plain", "quote\" backslash\\ slash/", "tab\t newline\n cr\r bs\b ff\f", "\x00\x01\x1f\x7f",
               "caf\u00e9", "\u2603 snow", "\U0001f600 emoji"]
    nested = {"z": [1, 2.0, "x"], "a": {"b": [], "c": {}, "\u00e9": None, "B": True}, "empty_list": [],
              "list_of_lists": [[1], []], "num": 1e-05}
    write_json(OUT / "python-json.json", {
        "floats": [{"value": v, "hex": v.hex(), "dumps": json.dumps(v)} for v in floats],
        "strings": [{"value": s, "dumps": json.dumps(s)} for s in strings],
        "nested": {"value": nested, "dumps": json.dumps(nested, indent=2, sort_keys=True)},
    })


def check_adapter(folder: str, name: str) -> None:
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(rel(FIXTURES_DIR / name), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder)
    found = [f"{w.category.__name__}: {w.message}" for w in caught]
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    layers = []
    worst = 0.0
    for mname, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            path = mname.removeprefix("base_model.model.")
            for which in ("lora_A", "lora_B"):
                loaded = getattr(module, which)["default"].weight
                saved = tensors.pop(f"base_model.model.{path}.{which}.weight")
                worst = max(worst, (loaded - saved).abs().max().item())
            layers.append({"name": path, "r": module.r["default"], "alpha": module.lora_alpha["default"],
                           "scaling": module.scaling["default"]})
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
    print(json.dumps({"warnings": found, "layers": layers, "max_abs_diff": worst, "unused_tensors": sorted(tensors)},
                     indent=1))
    if found or worst != 0.0 or tensors:
        raise SystemExit(1)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--check-adapter" and sys.argv[3] == "--model":
        torch_threads()
        check_adapter(sys.argv[2], sys.argv[4])
        return
    os.chdir(REPO_ROOT)
    torch_threads()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in TINY_MODELS:
        model_golden(name)
    init_golden()
    python_json_golden()


def torch_threads() -> None:
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


if __name__ == "__main__":
    main()
