"""`webtune eval` in PyTorch + transformers + PEFT, for checking webtune against the reference.

    tools/.venv/bin/python tools/peft_eval.py --model DIR --data FILE [--adapter DIR] [--seq N]

Prints one line {"loss", "tokens", "perplexity"} with exactly the CLI's semantics: the text is
tokenized as a whole with the tokenizer's default special tokens, cut into consecutive windows of
N tokens (a last window of at least 2 kept), and the loss is the mean cross-entropy over every
predicted position of every window. With --adapter the folder is loaded with
PeftModel.from_pretrained, and ANY warning (missing or unexpected keys, unknown config fields) is
an error: this is how a webtune export is shown to load cleanly in PEFT.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import load_checked  # noqa: E402
from peft_golden_common import collect_all_warnings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    model, tok = load_checked(Path(args.model))
    if args.adapter:
        from peft import PeftModel

        with collect_all_warnings() as found:
            model = PeftModel.from_pretrained(model, args.adapter)
            model.eval()
        if found:
            raise SystemExit("loading the adapter warned:\n  " + "\n  ".join(found))
    ids = tok(Path(args.data).read_text(encoding="utf-8"))["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), args.seq):
            window = ids[start : start + args.seq]
            if len(window) < 2:
                continue
            x = torch.tensor([window])
            logits = model(x).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            count += len(window) - 1
    loss = total / count
    print(json.dumps({"loss": loss, "tokens": count, "perplexity": math.exp(loss)}))


if __name__ == "__main__":
    main()
