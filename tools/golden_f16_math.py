"""Golden data of Hugging Face transformers computing in f16 (torch.float16 on the CPU) for every
test model: packages/models/test/golden/f16-math/<name>.json.

Run from the repository root after tools/golden_forward.py (it reads that script's batch):

    tools/.venv/bin/python tools/golden_f16_math.py

golden_forward.py's `logits_f16_weights` is the f32 forward of the f16-rounded matrices: the
reference that the engine's f16 tiles are compared with. This script runs the same batch through
the same model loaded in f16 (every parameter, norms and biases included, where the reference
rounds only the matrices; activations in f16 between operations, though RMSNorm and attention
compute inside in f32 on the CPU), as transformers serves a model in torch_dtype=float16, and
records how far that lands from the reference. The engine's f16 tiles are held to within a small multiple of
transformers' own f16 deviation (packages/models/test/f16_tiles.test.ts): the evidence that f16
tiles are as good a default for inference as f16 is in the library users compare with.

Each file holds the batch, transformers' f16 logits and loss, and the deviation from the reference:
max and root-mean-square |logits - logits_f16_weights| and |loss - loss_f16_weights|. Floats are
rounded to 7 significant digits. Deterministic (one torch thread).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import (  # noqa: E402
    FIXTURES_DIR,
    GOLDEN_DIR,
    REPO_ROOT,
    STORIES_DIR,
    TINY_MODELS,
    flat,
    load_checked,
    rel,
    round_sig,
    write_json,
)

OUT_DIR = REPO_ROOT / "packages/models/test/golden/f16-math"


def golden(name: str, folder: Path) -> dict:
    import torch
    import transformers

    ref = json.loads((GOLDEN_DIR / f"{name}.json").read_text(encoding="utf-8"))
    # Loaded straight in f16, as a user serving the model with torch_dtype=float16 would.
    model, _ = load_checked(folder, dtype=torch.float16)
    if any(p.dtype != torch.float16 for p in model.parameters()):
        raise SystemExit(f"{name}: not every parameter loaded in f16")
    x = torch.tensor(ref["input_ids"])
    with torch.no_grad():
        logits = model(x).logits.double()
    # The loss as the tests compute it: mean cross-entropy over B x (T - 1) predicted positions,
    # in float64 from the f16 logits.
    lp = torch.log_softmax(logits[:, :-1], -1)
    loss = float(-lp.gather(-1, x[:, 1:, None]).mean())
    want = torch.tensor(ref["logits_f16_weights"]["data"], dtype=torch.float64).reshape(logits.shape)
    diff = (logits - want).abs()
    if not torch.isfinite(logits).all():
        raise SystemExit(f"{name}: transformers' f16 logits are not finite")
    return {
        "model": name,
        "path": rel(folder),
        "generated_by": {
            "script": "tools/golden_f16_math.py",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": "float16",
        },
        "reference": rel(GOLDEN_DIR / f"{name}.json") + " (logits_f16_weights, loss_f16_weights)",
        "input_ids": ref["input_ids"],
        "loss_f16_math": round_sig(loss),
        "deviation": {
            "logits_max_abs": round_sig(float(diff.max())),
            "logits_rms": round_sig(float(diff.pow(2).mean().sqrt())),
            "loss_abs": round_sig(abs(loss - ref["loss_f16_weights"])),
        },
        "logits_f16_math": flat(logits.float()),
    }


def main() -> None:
    import torch

    torch.set_num_threads(1)
    models = [("stories260K", STORIES_DIR)] + [(n, FIXTURES_DIR / n) for n in TINY_MODELS]
    print(f"{'model':12} {'loss f16':>10} {'|Δloss|':>9} {'max |Δlogit|':>12} {'rms':>9}  file")
    for name, folder in models:
        rec = golden(name, folder)
        path = OUT_DIR / f"{name}.json"
        write_json(path, rec)
        d = rec["deviation"]
        print(f"{name:12} {rec['loss_f16_math']:10.6f} {d['loss_abs']:9.2e} {d['logits_max_abs']:12.4f} "
              f"{d['logits_rms']:9.2e}  {rel(path)}")


if __name__ == "__main__":
    main()
