"""Golden forward data from Hugging Face transformers (float32, CPU) for every test model:
packages/models/test/golden/forward/<name>.json for stories260K and each tiny-* fixture.

Run from the repository root (after `bash tools/setup-python.sh`, tools/convert_stories260k.py and
tools/make_tiny_models.py):

    tools/.venv/bin/python tools/golden_forward.py

Each file holds: the model folder, a batch of 2 x 11 input ids, their logits (also with the
matrices rounded to f16: logits_f16_weights, loss_f16_weights), the loss with
labels = input_ids, the hidden states of sequence 0, a 20-token greedy generation from sequence
0's first 5 tokens, and the `eval` record of packages/models/test/fixtures/text/shakespeare-4k.txt
(windows of 64 tokens, the CLI's `eval` semantics); stories260K also gets `generate_bos`. Floats are
rounded to 7 significant digits. Prints a summary table. Deterministic (one torch thread).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_common import (  # noqa: E402
    FIXTURES_DIR,
    GOLDEN_DIR,
    SHAKESPEARE_4K,
    STORIES_DIR,
    TINY_MODELS,
    flat,
    load_checked,
    rel,
    round_sig,
    write_json,
)

SEQ_LEN = 11
PROMPT_LEN = 5
NEW_TOKENS = 20
BOS_NEW_TOKENS = 60
EVAL_SEQ = 64
SENTENCES = {
    # sequence 0 of the batch: the first 11 ids of this text (through the model's tokenizer)
    "stories": "Once upon a time, there was a little girl named Lily.",
    "tiny": "One day, a little dog named Max went to the big park.",
    "gpt2": "First Citizen:\nBefore we proceed any further, hear me speak.",
}


def batch_ids(tok, text: str, vocab: int, seed: int) -> list[list[int]]:
    """Sequence 0: the text's first 11 ids. Sequence 1: seeded random ids in [0, vocab) with the
    largest id, vocab - 1, at position 3 (checks the table edge)."""
    import torch

    seq0 = tok(text)["input_ids"][:SEQ_LEN]
    if len(seq0) != SEQ_LEN:
        raise SystemExit(f"{text!r} gives only {len(seq0)} tokens")
    gen = torch.Generator().manual_seed(seed)
    seq1 = torch.randint(0, vocab, (SEQ_LEN,), generator=gen).tolist()
    seq1[3] = vocab - 1
    return [seq0, seq1]


def greedy(model, prompt: list[int], n_new: int, eos: int | None) -> dict:
    """Argmax for exactly n_new steps (never stopping at EOS), recomputing the whole prefix each
    step; margins[i] = top-1 minus top-2 logit at step i (how safe each argmax is). Checked
    against model.generate (KV cache), which stops after EOS."""
    import torch

    ids = list(prompt)
    margins = []
    with torch.no_grad():
        for _ in range(n_new):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = torch.topk(logits, 2).values
            margins.append(round_sig(float(top[0] - top[1])))
            ids.append(int(torch.argmax(logits)))
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)[0, len(prompt) :].tolist()
    new = ids[len(prompt) :]
    stop = new.index(eos) + 1 if eos is not None and eos in new else len(new)
    if gen != new[:stop]:
        raise SystemExit(f"model.generate {gen} differs from the argmax loop {new}")
    return {"prompt": list(prompt), "new_tokens": n_new, "new_ids": new, "min_margin": min(margins), "margins": margins}


def eval_record(model, tok, text_path: Path) -> dict:
    """The CLI's `eval`: the whole text tokenized once with the tokenizer's default special tokens,
    cut into consecutive windows of EVAL_SEQ tokens (a last window of >= 2 tokens kept, a shorter
    one dropped), loss = mean cross-entropy over every predicted position of every window
    (labels = input_ids per window, so a window of n tokens predicts n - 1)."""
    import torch

    ids = tok(text_path.read_text(encoding="utf-8"))["input_ids"]
    windows = [ids[i : i + EVAL_SEQ] for i in range(0, len(ids), EVAL_SEQ)]
    windows = [w for w in windows if len(w) >= 2]
    total, count, window_losses = 0.0, 0, []
    with torch.no_grad():
        for w in windows:
            x = torch.tensor([w])
            out = model(x, labels=x)
            n = len(w) - 1
            total += float(out.loss) * n
            count += n
            window_losses.append(round_sig(float(out.loss)))
    loss = total / count
    return {
        "text": rel(text_path),
        "seq": EVAL_SEQ,
        "text_tokens": len(ids),
        "windows": len(windows),
        "tokens": count,
        "loss": round_sig(loss),
        "perplexity": round_sig(math.exp(loss)),
        "window_losses": window_losses,
    }


def golden(name: str, folder: Path, sentence: str, seed: int) -> dict:
    import torch
    import transformers

    model, tok = load_checked(folder)
    if model.loss_type is None:
        # GPT2LMHeadModel's class name matches no loss type; transformers then warns and falls
        # back to ForCausalLM. Name it to skip the warning (same loss, checked below).
        model.loss_type = "ForCausalLM"
    cfg = model.config
    L = cfg.num_hidden_layers
    ids = batch_ids(tok, sentence, cfg.vocab_size, seed)
    x = torch.tensor(ids)

    # The output of the last decoder layer before the final norm (hidden_states[-1] is after it).
    layers = model.transformer.h if cfg.model_type == "gpt2" else model.model.layers
    captured = {}
    hook = layers[L - 1].register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("last", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        out = model(x, labels=x, output_hidden_states=True)
    hook.remove()
    hs = torch.stack([h[0] for h in out.hidden_states])  # (L + 1, T, hidden)
    if hs.shape[0] != L + 1:
        raise SystemExit(f"{name}: {hs.shape[0]} hidden states for {L} layers")
    # Check the documented meaning of the last entry: final norm of the last layer's output.
    final_norm = model.transformer.ln_f if cfg.model_type == "gpt2" else model.model.norm
    with torch.no_grad():
        if not torch.allclose(final_norm(captured["last"])[0], hs[-1], atol=1e-6):
            raise SystemExit(f"{name}: hidden_states[-1] is not the final norm of the last layer")
        # loss semantics: mean over B x (T - 1) predicted positions
        lp = torch.log_softmax(out.logits[:, :-1].double(), -1)
        ref_loss = -lp.gather(-1, x[:, 1:, None]).mean()
    if abs(float(ref_loss) - float(out.loss)) > 1e-5:
        raise SystemExit(f"{name}: loss {float(out.loss)} != mean CE {float(ref_loss)}")

    record = {
        "model": name,
        "path": rel(folder),
        "generated_by": {
            "script": "tools/golden_forward.py",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": "float32",
        },
        "architecture": cfg.architectures[0],
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": L,
        "hidden_size": cfg.hidden_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "input_ids": ids,
        "loss": round_sig(float(out.loss)),
        "generate": greedy(model, ids[0][:PROMPT_LEN], NEW_TOKENS, cfg.eos_token_id),
        "eval": eval_record(model, tok, SHAKESPEARE_4K),
    }
    if name == "stories260K":
        g = greedy(model, [cfg.bos_token_id], BOS_NEW_TOKENS, None)
        g["text"] = tok.decode([cfg.bos_token_id] + g["new_ids"], skip_special_tokens=True)
        record["generate_bos"] = g
    record["logits"] = flat(out.logits)
    record["hidden_states"] = flat(hs)
    record["last_layer_output"] = flat(captured["last"][0])
    # The same forward with every matrix (embeddings, projections, LM head) rounded to f16, as the
    # engine stores them by default; norms and biases stay f32 and all arithmetic is f32. This is
    # what the engine's f16-weight path is compared with.
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() == 2:
                param.copy_(param.half().float())
        out16 = model(x, labels=x)
    record["loss_f16_weights"] = round_sig(float(out16.loss))
    record["logits_f16_weights"] = flat(out16.logits)
    return record


def main() -> None:
    import torch

    torch.set_num_threads(1)
    models = [("stories260K", STORIES_DIR, SENTENCES["stories"])]
    models += [(n, FIXTURES_DIR / n, SENTENCES["gpt2" if n == "tiny-gpt2" else "tiny"]) for n in TINY_MODELS]
    rows = []
    for i, (name, folder, sentence) in enumerate(models):
        rec = golden(name, folder, sentence, seed=7000 + i)
        path = GOLDEN_DIR / f"{name}.json"
        write_json(path, rec)
        rows.append((name, rec, path.stat().st_size))
    print(f"{'model':12} {'loss':>9} {'eval loss':>9} {'eval ppl':>9} {'eval tok':>8} {'gen min margin':>14} {'bytes':>8}  file")
    for name, rec, size in rows:
        e = rec["eval"]
        print(f"{name:12} {rec['loss']:9.5f} {e['loss']:9.5f} {e['perplexity']:9.3f} {e['tokens']:8} "
              f"{rec['generate']['min_margin']:14.4f} {size:8,}  {rel(GOLDEN_DIR / (name + '.json'))}")
    g = rows[0][1]["generate_bos"]
    print(f"stories260K greedy from BOS ({g['new_tokens']} tokens): {g['text']!r}")


if __name__ == "__main__":
    main()
