"""The training loop: `fit` trains the trainable parameters of a model on tokenised examples.

One optimizer step = ``grad_accum`` micro-batches on each of ``world_size`` processes. The loss of every
micro-batch is its *sum* over label tokens divided by the label-token count of the whole global batch, so
the accumulated gradient is exactly the gradient of the global batch's mean loss, whatever the split into
micro-batches and processes (DDP averages over processes, hence the extra ``× world_size``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.train import fsdp
from lorakit.train.adapter import load_trainable_state, trainable_state, write_adapter
from lorakit.train.attention_kernel import attention_kernel_for
from lorakit.train.checkpoint import (
    capture_rng_state,
    check_resumable,
    load_checkpoint,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from lorakit.train.config import TrainConfig, write_yaml
from lorakit.train.distributed import Distributed, check_all_have_grads, wrap_ddp
from lorakit.train.early_stopping import EarlyStopping
from lorakit.train.evaluate import Collate, Scorer, evaluate_loss, to_device
from lorakit.train.lean_activations import LeanActivations
from lorakit.train.length_split import example_lengths, split_by_length
from lorakit.train.loss import LossModule, count_label_tokens
from lorakit.train.metrics import PLOT_FILE, MetricsLog, plot_loss, read_metrics
from lorakit.train.optim import build_optimizer, build_scheduler, trainable_named_parameters
from lorakit.train.output import RUN_CONFIG_FILE, read_run_state, remove_run_state, write_run_state
from lorakit.train.progress import TrainCallback
from lorakit.train.sampler import BatchPlan
from lorakit.train.state import Position, TrainResult

AdapterWriter = Callable[[nn.Module, Path], Any]


def fit(
    model: nn.Module,
    train_data: Sequence[Any],
    config: TrainConfig,
    *,
    collate: Collate,
    eval_data: Sequence[Any] | None = None,
    scorer: Scorer | None = None,
    callback: TrainCallback | None = None,
    context: Distributed | None = None,
    adapter_writer: AdapterWriter | None = write_adapter,
) -> TrainResult:
    """Train the trainable parameters (the adapter) of ``model`` on ``train_data``; write ``config.output``.

    ``train_data`` / ``eval_data`` are sequences of examples and ``collate(list_of_examples)`` makes a batch:
    for ``task="causal"`` a dict with ``input_ids`` (b, s), ``labels`` (b, s; -100 where no loss) and
    usually ``attention_mask`` (b, s); for ``task="classify"`` ``labels`` is (b,) class ids. ``scorer``
    adds metrics at each evaluation (exact match, ...). Only the main process writes files and calls
    ``callback``. ``config``'s model, data and adapter fields are not read here: ``model`` already has
    its adapter. Under torchrun, ``context`` defaults to joining the process group.

    The output folder receives ``run_config.yaml`` (``config``), ``metrics.jsonl``, ``loss.png``,
    ``checkpoints/step-N`` every ``save_every`` steps and, at the end, the adapter files
    (``adapter_writer(model, folder)``; None writes none) and then ``run_state.json``. The caller owns the
    folder (`train` checks it first with `lorakit.train.output.prepare_output`). With ``config.resume``
    a checkpoint of another run (other options, data size or global batch) is refused naming the
    differences, and a run that has already ended is not rewritten: the same length does nothing
    (``result.already_finished``), a shorter one raises ValueError.
    """
    owns_context = context is None
    context = context or Distributed.from_env(config.device)
    try:
        trainer = Trainer(
            model,
            train_data,
            config,
            collate=collate,
            eval_data=eval_data,
            scorer=scorer,
            callback=callback,
            context=context,
            adapter_writer=adapter_writer,
        )
        return trainer.run()
    finally:
        if owns_context:
            context.close()


class Trainer:
    """One run of `fit`: set-up and resume in ``__init__``, then `run` (steps, evaluations, checkpoints)."""

    def __init__(
        self,
        model: nn.Module,
        train_data: Sequence[Any],
        config: TrainConfig,
        *,
        collate: Collate,
        eval_data: Sequence[Any] | None,
        scorer: Scorer | None,
        callback: TrainCallback | None,
        context: Distributed,
        adapter_writer: AdapterWriter | None,
    ) -> None:
        if config.bf16:
            _check_4bit_compute_dtype(model)
        self.model, self.config, self.context = model, config, context
        self.train_data, self.eval_data, self.collate, self.scorer = train_data, eval_data, collate, scorer
        self.adapter_writer = adapter_writer
        self.output = Path(config.output)
        self.device = context.device
        model.to(self.device)
        if config.grad_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        self.loss_module = LossModule(model, config.task, config.loss_chunk_size)
        if config.fsdp:  # before the optimizer is built: sharding replaces the parameters by DTensors
            fsdp.shard_model(self.loss_module, model, context, config.bf16)
        self.named_parameters = trainable_named_parameters(model)
        # Checkpointed blocks keep only their inputs, and their recompute in backward runs outside the
        # context: the two do not mix (and together would save nothing more).
        lean = config.lean_activations and not config.grad_checkpointing
        self.lean = LeanActivations(model) if lean else contextlib.nullcontext()
        self.plan = BatchPlan(
            len(train_data),
            config.batch_size,
            config.grad_accum,
            context.world_size,
            context.rank,
            config.seed,
        )
        # One process: each micro-batch is cut into groups of similar length (the same gradient, less
        # padding and a lower peak: lorakit.train.length_split). Several processes keep the plan's split:
        # DDP and FSDP need as many forward passes on every process.
        split = config.split_by_length and not context.enabled
        self.example_lengths = example_lengths(train_data) if split else None
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.plan.steps_per_epoch))
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.position = Position()
        self.early = EarlyStopping(config.early_stopping_patience, config.greater_is_better)
        self.best_state: dict[str, torch.Tensor] | None = None

        # A run that already ended is never rewritten: asked for its length again there is nothing to do,
        # asked for fewer steps than it ran it refuses (files untouched); asked for more it continues.
        ended = read_run_state(self.output) if config.resume else None
        self.already_finished = ended is not None and ended.get("total_steps") == self.total_steps
        if ended is not None and not self.already_finished and ended["step"] > self.total_steps:
            raise ValueError(
                f"the run in {self.output} already finished at step {ended['step']}, after the "
                f"{self.total_steps} steps asked for; nothing was changed. Ask for more steps to continue it"
            )
        self.resumed_from = resolve_resume(config.resume, self.output)
        if self.resumed_from is not None:
            self._restore(self.resumed_from)
            if self.position.step > self.total_steps:
                raise ValueError(
                    f"checkpoint {self.resumed_from} is at step {self.position.step}, after the "
                    f"{self.total_steps} steps asked for; resuming would replace later outputs with earlier "
                    "ones, so nothing was changed. Ask for at least that many steps"
                )
        else:
            context.broadcast_parameters([] if config.fsdp else [p for _, p in self.named_parameters])
            # Each process its own dropout stream; rank 0's equals a single-process run's.
            seed_everything(config.seed + context.rank)
        self.ddp = self.loss_module  # sharded in place under FSDP
        if not config.fsdp:
            self.ddp = wrap_ddp(self.loss_module, context, config.ddp_find_unused_parameters)
        self.callback = callback if (callback is not None and context.is_main) else TrainCallback()
        self.log = MetricsLog(self.output) if context.is_main and not self.already_finished else None
        if self.log is not None:
            remove_run_state(self.output)  # from here on the folder is a run in progress again
            write_yaml(config.replace(overwrite=False), self.output / RUN_CONFIG_FILE)
            self.log.truncate_after(self.position.step)  # a resumed run rewrites what followed its checkpoint
        self.autocast = make_autocast(self.device, config.bf16)
        self.attention_kernel = attention_kernel_for(model, self.device)
        # DDP without unused-parameter search needs a gradient for every adapter: checked after step 1.
        self.grads_checked = not context.enabled or config.ddp_find_unused_parameters

    def run(self) -> TrainResult:
        result = TrainResult(
            step=self.position.step,
            total_steps=self.total_steps,
            resumed_from=self.resumed_from,
            output=self.output,
            model=self.model,
        )
        if self.already_finished:  # resumed after its end: the outputs stay as they are
            result.step, result.already_finished = self.total_steps, True
            return result
        self.callback.on_train_start(self.total_steps, self.position.step)
        while self.position.step < self.total_steps:
            started = time.perf_counter()
            record = self._step()
            record["tokens_per_s"] = record["tokens"] / max(time.perf_counter() - started, 1e-9)
            result.losses.append(record["loss"])
            result.step = self.position.step
            if self.log is not None and (
                self.position.step % self.config.log_every == 0 or self.position.step == self.total_steps
            ):
                self.log.append(record)
            self.callback.on_step(record)
            if self.eval_data is not None and _due(
                self.position.step, self.config.eval_every, self.total_steps
            ):
                result.eval_history.append(self._evaluate())
                result.stopped_early = self.early.should_stop
            every = self.config.save_every
            if every and self.position.step % every == 0 and self.position.step < self.total_steps:
                self._save_checkpoint()
            if result.stopped_early:
                break
        self._finish(result)
        return result

    # --- one optimizer step ----------------------------------------------------------------------------

    def _step(self) -> dict[str, Any]:
        """Forward and backward every micro-batch of this process, then clip and update; the step's record."""
        config, context = self.config, self.context
        micro_batches = self.plan.micro_batches(self.position.epoch, self.position.batch_index)
        if self.example_lengths is not None:
            micro_batches = [
                group for indices in micro_batches for group in split_by_length(indices, self.example_lengths)
            ]
        batches = [
            to_device(self.collate([self.train_data[i] for i in indices]), self.device)
            for indices in micro_batches
        ]
        local = torch.tensor(
            [sum(count_label_tokens(b, config.task) for b in batches), sum(_token_count(b) for b in batches)],
            dtype=torch.float64,
        )
        targets, tokens = context.all_reduce_sum(local).tolist()
        scale = context.world_size / max(targets, 1.0)
        loss_total = torch.zeros((), dtype=torch.float64)
        for index, batch in enumerate(batches):
            # DDP all-reduces the gradients in the backward of the last micro-batch only.
            last = index == len(batches) - 1
            sync = contextlib.nullcontext() if last or not context.enabled else fsdp.no_sync(self.ddp)
            # backward too: gradient checkpointing recomputes the blocks there, on the same kernel
            with sync, self.attention_kernel(batch["input_ids"].shape[-1]):
                with self.autocast(), self.lean:
                    loss_sum, _ = self.ddp(batch)
                (loss_sum * scale).backward()
            loss_total += loss_sum.detach().double().cpu()
        if not self.grads_checked:
            check_all_have_grads(self.named_parameters)
            self.grads_checked = True
        max_norm = config.max_grad_norm if config.max_grad_norm is not None else math.inf
        grad_norm = fsdp.scalar(
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named_parameters], max_norm)
        )
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position.advance(self.plan.steps_per_epoch)
        return {
            "kind": "train",
            "step": self.position.step,
            "epoch": self.position.epoch + self.position.batch_index / self.plan.steps_per_epoch,
            "loss": float(context.all_reduce_sum(loss_total)) / max(targets, 1.0),
            "lr": learning_rate,
            "grad_norm": grad_norm,
            "label_tokens": int(targets),
            "tokens": int(tokens),
        }

    # --- evaluation, checkpoints, the end --------------------------------------------------------------

    def _evaluate(self) -> dict[str, Any]:
        """Eval loss (+ accuracy, + the scorer's metrics); updates early stopping and the best adapter."""
        config = self.config
        metrics = evaluate_loss(
            self.loss_module,
            self.eval_data,
            self.collate,
            config.eval_batch_size or config.batch_size,
            self.context,
            self.autocast,
        )
        if self.scorer is not None:
            # Generation runs on rank 0 only; every process gets its numbers so all stop together.
            scored = _score(self.scorer, self.model) if self.context.is_main else None
            metrics.update(self.context.broadcast_object(scored))
        record = {"kind": "eval", "step": self.position.step, **metrics}
        if self.log is not None:
            self.log.append(record)
        self.callback.on_eval(record)
        watched = f"eval_{config.eval_metric}"
        if watched not in metrics:
            raise ValueError(f"eval_metric={config.eval_metric!r} but the evaluation gives {sorted(metrics)}")
        if self.early.update(metrics[watched], self.position.step) and config.early_stopping_patience:
            with fsdp.full_trainable_state(self.model):
                self.best_state = trainable_state(self.model)
        return record

    @fsdp.gathers_trainable_state  # under FSDP: the whole adapter and optimizer state, unsharded
    def _save_checkpoint(self) -> None:
        rng_states = self.context.gather_objects(capture_rng_state())  # a collective: every process joins
        if self.context.is_main:
            plan = self.plan
            state = {
                "trainable": trainable_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_states,
                "position": vars(self.position).copy(),
                "plan": {
                    "num_examples": plan.num_examples,
                    "global_batch_size": plan.global_batch_size,
                    "seed": plan.seed,
                },
                "early_stopping": self.early.state_dict(),
                "best_trainable": self.best_state,
                "total_steps": self.total_steps,
                "config": self.config.to_dict(),  # a resume checks it asks for the same run
                "world_size": self.context.world_size,
            }
            writer = self.adapter_writer
            extra = (lambda folder: writer(self.model, folder)) if writer is not None else None
            path = save_checkpoint(
                self.output, self.position.step, state, self.config.keep_checkpoints, extra
            )
            self.callback.on_checkpoint(path)
        self.context.barrier()

    @fsdp.gathers_trainable_state
    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path)
        check_resumable(state, self.config, self.plan, path)
        load_trainable_state(self.model, state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.position = Position(**state["position"])
        self.early.load_state_dict(state["early_stopping"])
        self.best_state = state.get("best_trainable")
        rng = state["rng"]
        if len(rng) == self.context.world_size:
            restore_rng_state(rng[self.context.rank])
        else:  # another number of processes: the data order continues exactly, dropout starts anew
            seed_everything(self.config.seed + self.context.rank + self.position.step)

    @fsdp.gathers_trainable_state
    def _finish(self, result: TrainResult) -> None:
        if self.best_state is not None:
            load_trainable_state(self.model, self.best_state)
        result.best_metric, result.best_step = self.early.best, self.early.best_step
        if self.context.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            if self.adapter_writer is not None:
                self.adapter_writer(self.model, self.output)
            plot_loss(read_metrics(self.output), self.output / PLOT_FILE)
            # Last: its presence says every output above is complete and belongs to this step.
            write_run_state(
                self.output,
                {"step": result.step, "total_steps": self.total_steps, "stopped_early": result.stopped_early},
            )
        self.context.barrier()
        self.callback.on_train_end(result)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward, non-reentrant, so a frozen base needs no input hack.

    The reentrant variant only back-propagates into a block when one of its *inputs* requires grad; with a
    frozen base the hidden states do not, so the adapters inside would get no gradient. The non-reentrant
    variant follows the autograd graph of the parameters instead.

    Raises:
        ValueError: the model is not a transformers model that supports gradient checkpointing.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing (grad_checkpointing)"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_autocast(device: torch.device, bf16: bool) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on the device's type (CPU or CUDA), or a no-op."""
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _check_4bit_compute_dtype(model: nn.Module) -> None:
    """bf16 autocast next to 4-bit layers that compute in fp32 mixes dtypes inside the LoRA layers."""
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit" and getattr(module, "compute_dtype", None) == torch.float32:
            raise ValueError(
                f"bf16 training with a 4-bit base needs bf16 compute: {name} computes in fp32. Load the "
                "model with dtype='bfloat16' (lorakit.models.load_causal_lm(..., quantize='nf4', "
                "dtype='bfloat16'))"
            )


def _token_count(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _due(step: int, every: int | None, total_steps: int) -> bool:
    return step == total_steps or (every is not None and step % every == 0)


def _score(scorer: Scorer, model: nn.Module) -> dict[str, float]:
    metrics = scorer(model)
    return {key if key.startswith("eval_") else f"eval_{key}": float(value) for key, value in metrics.items()}
