"""Continue a webtune LoRA training job with Hugging Face TRL + PEFT.

    pip install -r requirements.txt
    accelerate launch train.py            # every GPU of this machine; `accelerate config` for more

Everything about the job is in job.json, written by webtune's exportJob: the base model, the LoRA
configuration, the training settings (named as transformers' TrainingArguments names them) and the
data files. The data is already tokenized: each line of data/*.jsonl holds the token ids and labels
webtune trained on ({"input_ids": [...], "labels": [...]}, labels -100 where no loss is taken),
which SFTTrainer uses as they are, so the cluster trains on the same tokens with the same loss
mask. By default training continues from the adapter in adapter/; --fresh starts a new LoRA with
the same configuration instead. The final adapter is written in PEFT's format to --output-dir.
"""

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", type=Path, default=HERE / "job.json",
                   help="the job file (default: job.json beside this script)")
    p.add_argument("--base-model",
                   help="load the base model from this folder or Hub id instead of job.json's base_model")
    p.add_argument("--output-dir", type=Path, default=Path("output"),
                   help="where checkpoints and the final adapter go (default: output)")
    p.add_argument("--fresh", action="store_true",
                   help="start a new LoRA from job.json's configuration instead of the exported adapter")
    p.add_argument("--max-steps", type=int, help="override job.json's max_steps (optimizer steps)")
    p.add_argument("--epochs", type=float, help="train this many epochs instead of max_steps")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 weights and autocast (webtune computes in f32; bf16 is faster on GPUs)")
    p.add_argument("--report-to", default="none",
                   help="transformers' report_to: none, tensorboard, wandb, ... (default: none)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the job, build the configs, read the data and print them as JSON; load no model")
    return p.parse_args(argv)


# Every field this script reads, checked up front: a clear error rather than a KeyError mid-run.
NEEDED = {
    "base_model": ["name_or_path"],
    "adapter": ["path", "modules"],
    "lora": ["r", "lora_alpha", "target_modules"],
    "training": ["learning_rate", "adam_beta1", "adam_beta2", "adam_epsilon", "weight_decay", "max_grad_norm",
                 "lr_scheduler_type", "warmup_steps", "max_steps", "num_train_epochs",
                 "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed",
                 "eval_steps", "save_steps", "gradient_checkpointing"],
    "data": ["train", "validation"],
}


def load_job(path):
    try:
        job = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        sys.exit(f"error: cannot read the job file {path}: {error}")
    missing = [f"{section}.{key}" for section, keys in NEEDED.items() for key in keys
               if key not in job.get(section, {})]
    if missing:
        sys.exit(f"error: {path} lacks {', '.join(missing)} (was it written by webtune's exportJob?)")
    return job


def lora_config(job):
    """PEFT's LoraConfig from job.json's lora section, field for field."""
    from peft import LoraConfig

    return LoraConfig(**job["lora"])


def sft_config(job, args):
    """SFTConfig: each training setting of job.json, as webtune used it."""
    from trl import SFTConfig

    t = job["training"]
    max_steps = args.max_steps if args.max_steps is not None else t["max_steps"]
    has_validation = job["data"]["validation"] is not None
    return SFTConfig(
        output_dir=str(args.output_dir),
        learning_rate=t["learning_rate"],
        optim="adamw_torch",  # torch.optim.AdamW, as webtune's optimizer (decoupled weight decay)
        adam_beta1=t["adam_beta1"],
        adam_beta2=t["adam_beta2"],
        adam_epsilon=t["adam_epsilon"],
        weight_decay=t["weight_decay"],
        max_grad_norm=t["max_grad_norm"],  # 0 = no clipping
        lr_scheduler_type=t["lr_scheduler_type"],
        warmup_steps=t["warmup_steps"],
        max_steps=-1 if args.epochs is not None else max_steps,
        num_train_epochs=args.epochs if args.epochs is not None else t["num_train_epochs"],
        per_device_train_batch_size=t["per_device_train_batch_size"],
        per_device_eval_batch_size=t["per_device_train_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        gradient_checkpointing=t["gradient_checkpointing"],
        seed=t["seed"],
        max_length=t["max_length"],
        packing=False,  # one example per row, as webtune batches them
        shuffle_dataset=False,  # the trainer's sampler shuffles each epoch; keep the rows as written
        eval_strategy="steps" if has_validation else "no",
        eval_steps=t["eval_steps"] if has_validation else None,
        save_strategy="steps" if t["save_steps"] > 0 else "no",
        save_steps=t["save_steps"] if t["save_steps"] > 0 else 500,
        logging_steps=1,
        bf16=args.bf16,
        report_to=args.report_to,
    )


def load_data(job, job_dir):
    from datasets import load_dataset

    files = {"train": str(job_dir / job["data"]["train"])}
    if job["data"]["validation"] is not None:
        files["validation"] = str(job_dir / job["data"]["validation"])
    data = load_dataset("json", data_files=files)
    for split, dataset in data.items():
        if set(dataset.column_names) != {"input_ids", "labels"}:
            sys.exit(f"error: {files[split]} has columns {dataset.column_names}; expected input_ids and labels")
    return data


def check_prepared(name, source, prepared):
    """SFTTrainer must train on the rows as written: no retokenizing, truncating, dropping or relabelling."""
    # As Arrow tables with any row selection (filter) applied, compared without converting to Python.
    a, b = source.with_format("arrow")[:], prepared.with_format("arrow")[:]
    if a.num_rows != b.num_rows or not all(a.column(c).equals(b.column(c)) for c in ("input_ids", "labels")):
        sys.exit(f"error: SFTTrainer changed the {name} data while preparing it (this TRL version treats "
                 "pre-tokenized data differently); the run would not train on webtune's tokens and loss mask")


def adapted_modules(model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return sorted(n.removeprefix(prefix) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def dry_run_summary(job, base, peft_config, config, data):
    """What --dry-run prints: the settings as PEFT and TRL hold them, and the data as read."""
    fields = list(job["training"]) + ["optim", "packing", "eval_strategy", "save_strategy", "bf16"]
    return {
        "base_model": base,
        "lora_config": {k: v for k, v in peft_config.to_dict().items() if k in job["lora"]},
        "sft_config": {k: getattr(config, k) for k in fields if hasattr(config, k)},
        "data": {split: {"rows": len(d), "columns": d.column_names} for split, d in data.items()},
    }


def main(argv=None):
    args = parse_args(argv)
    job = load_job(args.job)
    job_dir = args.job.resolve().parent
    base = args.base_model or job["base_model"]["name_or_path"]
    peft_config = lora_config(job)
    config = sft_config(job, args)
    data = load_data(job, job_dir)

    if args.dry_run:
        # PEFT holds a list of targets as a set; enums (the scheduler type) print as their value.
        plain = lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)  # noqa: E731
        print(json.dumps(dry_run_summary(job, base, peft_config, config, data), indent=2, default=plain))
        return

    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTTrainer

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    revision = job["base_model"].get("revision") if args.base_model is None else None
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, revision=revision)
    # Only for the pad id: the data is already tokenized.
    tokenizer = AutoTokenizer.from_pretrained(base, revision=revision)
    if args.fresh:
        set_seed(job["training"]["seed"])  # the new LoRA's initial weights
        model = get_peft_model(model, peft_config)
    else:
        model = PeftModel.from_pretrained(model, str(job_dir / job["adapter"]["path"]), is_trainable=True)
    found, expected = adapted_modules(model), sorted(job["adapter"]["modules"])
    if found != expected:
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        sys.exit(f"error: LoRA sits on {len(found)} modules of {base}, the job expects {len(expected)}: "
                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and os.environ.get("RANK", "0") == "0":
        t = job["training"]
        print(f"note: {world} processes: each step takes {world} x {t['per_device_train_batch_size']} x "
              f"{t['gradient_accumulation_steps']} sequences (webtune's step took 1 x that)")

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data.get("validation"),
        processing_class=tokenizer,
    )
    check_prepared("train", data["train"], trainer.train_dataset)
    if "validation" in data:
        check_prepared("validation", data["validation"], trainer.eval_dataset)
    trainer.train()
    trainer.save_model(str(args.output_dir))
    if trainer.is_world_process_zero():
        print(f"adapter written to {args.output_dir}")


if __name__ == "__main__":
    main()
