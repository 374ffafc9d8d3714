"""One TRL SFT job, as a user writes it: `SFTTrainer` + peft's LoraConfig on a prompt-completion JSONL file.

Run by `bench_sft.py` in its own process (timed as a whole from outside). Writes the adapter (PEFT
layout) into ``--output`` and ``--phases`` (seconds since the process started at each phase, and the
final eval loss). The training options mirror ``lorakit train``'s flags one for one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STARTED = time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="HF model folder")
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--phases", required=True, help="JSON file for the phase times")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true", help="TRL's default; off for speed")
    parser.add_argument("--padding-free", action="store_true", help="TRL's padding-free batches")
    args = parser.parse_args()
    phases: dict[str, float] = {}

    def mark(name: str) -> None:
        phases[name] = time.time() - STARTED

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    mark("imports")

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                mark("first_step")

    # The rows are read with the json module: `datasets.load_dataset("json")` (pyarrow) turns the short job's
    # answers ("1963-03-26") into timestamps, which the chat template renders "1963-03-26 00:00:00", even
    # when the features say string (the timestamp is cast back to text).
    data = {
        split: Dataset.from_list(
            [json.loads(line) for line in Path(path).read_text("utf-8").splitlines() if line]
        )
        for split, path in (("train", args.train), ("eval", args.eval))
    }
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    mark("model_loaded")
    config = SFTConfig(
        output_dir=args.output,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        num_train_epochs=args.epochs,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        seed=args.seed,
        data_seed=args.seed,
        bf16=args.bf16,
        use_cpu=True,
        gradient_checkpointing=args.grad_checkpointing,
        padding_free=args.padding_free,
        # padding-free batches do not truncate: the jobs' examples are all shorter than max_length anyway
        max_length=None if args.padding_free else args.max_length,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["eval"],
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[FirstStep()],
    )
    mark("prepared")  # datasets tokenised, adapter injected
    trainer.train()
    mark("trained")
    metrics = trainer.evaluate()
    mark("evaluated")
    trainer.save_model(args.output)
    mark("saved")
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    with open(args.phases, "w", encoding="utf-8") as file:
        json.dump(
            {
                "phases": phases,
                "eval_loss": metrics.get("eval_loss"),
                "steps": trainer.state.global_step,
                "logged_losses": losses,
                "trl_version": __import__("trl").__version__,
            },
            file,
        )


if __name__ == "__main__":
    main()
