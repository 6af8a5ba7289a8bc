"""``ZOTrainer``: the Hugging Face ``Trainer`` with zeroth-order steps from subzero_ds.

Switch a Trainer script to SubZero by adding a ``"subzero"`` section to its DeepSpeed JSON and
changing one class name::

    args = TrainingArguments(output_dir="out", deepspeed="ds.json", max_steps=1000, logging_steps=10, ...)
    trainer = ZOTrainer(model=model, args=args, train_dataset=..., eval_dataset=..., compute_metrics=...)
    trainer.train()

What happens underneath:

- The model is wrapped by :func:`subzero_ds.initialize` (the same engine, the same shard-local
  directions as ``subzero-train``) under the ZeRO stage the JSON names, once, when the trainer is
  built. DeepSpeed is driven by us, not by the Trainer's DeepSpeed integration: the Trainer sees a
  plain multi-process run (its DataLoader shards the data over the ranks), and never builds a
  DeepSpeed optimizer, gradients or a scheduler block.
- Each micro-batch of ``training_step`` runs the method's probes; at the end of a gradient
  accumulation window (``gradient_accumulation_steps``, the JSON's "auto" filled from it) the ZO
  update. The loss a step logs is (ℓ+ + ℓ−)/2, averaged over ranks.
- Learning rate: ``subzero.lr`` is the base rate and the Trainer's schedule (``lr_scheduler_type``,
  ``warmup_steps``/``warmup_ratio``) scales it, step by step. ``learning_rate`` must then be left at
  its default or equal ``subzero.lr``: two different rates are refused, naming both.
- Checkpoints (``save_strategy``/``save_steps``): Trainer's ``checkpoint-N`` folders hold its own
  state (trainer state, scheduler, RNG) and our sharded ZO checkpoint in ``checkpoint-N/zo/``;
  ``train(resume_from_checkpoint=...)`` continues bit-exactly. Full weights are not gathered into
  every checkpoint (``subzero-export checkpoint-N/zo/checkpoint-N`` writes them);
  ``save_model()`` writes weights ``from_pretrained`` loads (a PEFT model: its adapter).
- Faults (``train``): on SIGTERM/SIGUSR1 every rank finishes its step, the Trainer saves ``checkpoint-N``
  and the process exits with code 4; a collective that waits past ``subzero.collective_timeout`` (the
  process group's timeout, in place of ``ddp_timeout``) ends every live rank with one message and code 5.
- Refused with one clear error each: ``optimizers=`` (a ZO run has no first-order optimizer),
  ``fp16`` (loss scaling has no place in ZO; use bf16 or fp32), a DeepSpeed ``optimizer`` or
  ``scheduler`` block, and no ``"subzero"`` section.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

import subzero_ds

from ..config import SECTION, ConfigError, ReplicaMode, load_ds_config, parse_config
from ..distributed import barrier, exit_process, is_local_main_process, is_main_process, set_collective_timeout
from ..faults import Activity, CollectiveTimeoutError, ExitCode, PreemptionSignals, stop_on_collective_timeout
from ..loss import model_loss

ZO_CHECKPOINT_DIR = "zo"
# TrainingArguments' default learning rate: left alone, ``subzero.lr`` is used.
HF_DEFAULT_LEARNING_RATE = TrainingArguments.__dataclass_fields__["learning_rate"].default


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer steps are subzero_ds ZO steps under DeepSpeed ZeRO.

    Takes the Trainer's arguments; ``args.deepspeed`` (a JSON path or dict) must hold a
    ``"subzero"`` section. The SubZeroEngine is :attr:`zo_engine`.

    Raises:
        ConfigError: no DeepSpeed config or ``"subzero"`` section, ``optimizers=``, ``fp16``, or a
            ``learning_rate`` that contradicts ``subzero.lr``.
    """

    def __init__(self, model: Any = None, args: TrainingArguments | None = None, *trainer_args: Any,
                 optimizers: tuple = (None, None), **kwargs: Any) -> None:
        plugin = getattr(args, "deepspeed_plugin", None)  # `accelerate launch` with a DeepSpeed config brings one
        if args is None or not (args.deepspeed or plugin is not None):
            raise ConfigError('ZOTrainer needs TrainingArguments(deepspeed="ds.json") (or `accelerate launch` with a '
                              'DeepSpeed config file) with a "subzero" section: the DeepSpeed config names the ZeRO '
                              "stage and the ZO method.")
        if any(o is not None for o in optimizers):
            raise ConfigError("ZOTrainer(optimizers=...) was given, but a zeroth-order run has no first-order "
                              'optimizer or scheduler: remove `optimizers`; set the rate as `subzero.lr` and the '
                              "schedule with TrainingArguments' lr_scheduler_type / warmup_steps.")
        if args.fp16:
            raise ConfigError("TrainingArguments(fp16=True) was given: fp16 loss scaling has no place in "
                              "zeroth-order training. Use bf16=True (or fp32).")
        ds_config = self._deepspeed_config(args)
        settings = parse_config(ds_config, f"the DeepSpeed config ({args.deepspeed or 'accelerate'!r})")
        if settings.replica_mode is ReplicaMode.PERTURBATION:
            raise ConfigError(
                '`subzero.replica_mode` is "perturbation", but the Trainer\'s sampler gives every rank its own batch, '
                "while perturbation mode needs a replica group's ranks to share one. Set it to \"data\" with ZOTrainer, "
                "or train with `python -m subzero_ds.train` (or `subzero_ds.initialize` and a loader that gives each "
                "rank its share `engine.replicas.batch_share()`)."
            )
        if args.learning_rate not in (HF_DEFAULT_LEARNING_RATE, settings.lr):
            raise ConfigError(
                f"TrainingArguments(learning_rate={args.learning_rate:g}) and `subzero.lr` = {settings.lr:g} disagree. "
                "ZOTrainer uses `subzero.lr` (the Trainer's schedule scales it): leave learning_rate at its default "
                "or set it equal to `subzero.lr`."
            )
        # The Trainer sees a plain multi-process run: DeepSpeed is ours to drive (no DeepSpeed optimizer).
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"  # set by `accelerate launch`; it would bring DeepSpeed back
        # The process group (the Trainer's, or ours) waits subzero.collective_timeout in a collective, not ddp_timeout.
        plain = dataclasses.replace(args, deepspeed=None, learning_rate=settings.lr,
                                    ddp_timeout=math.ceil(settings.collective_timeout))
        self.zo_config = ds_config
        super().__init__(model, plain, *trainer_args, **kwargs)
        if dist.is_initialized():  # made before (by the script, or accelerate): its timeout is changed in place
            set_collective_timeout(settings.collective_timeout)
        loss_fn = model_loss if type(self).compute_loss is Trainer.compute_loss else self._user_loss
        self.zo_engine = subzero_ds.initialize(model=self.model, config=ds_config, loss_fn=loss_fn)
        self.model = self.zo_engine.module
        self.model_wrapped = self.zo_engine.ds_engine

    @staticmethod
    def _deepspeed_config(args: TrainingArguments) -> dict[str, Any]:
        """The JSON with the Trainer's "auto" values filled (batch sizes, accumulation, bf16)."""
        hf_config = getattr(args, "hf_deepspeed_config", None)
        plugin = getattr(args, "deepspeed_plugin", None)
        if hf_config is None and plugin is not None:  # accelerate's config file
            hf_config = plugin.hf_ds_config
        config = dict(hf_config.config) if hf_config is not None else load_ds_config(args.deepspeed)
        if SECTION not in config:
            raise ConfigError(f'the DeepSpeed config {args.deepspeed!r} has no "{SECTION}" section: add one (see '
                              "ds_configs/zero3_subzero.json) to train with ZOTrainer.")
        zero = config.get("zero_optimization") or {}
        # Sizes left "auto" depend on the model in HF's integration; ours are DeepSpeed's defaults.
        config["zero_optimization"] = {k: v for k, v in zero.items() if v != "auto"}
        return {k: v for k, v in config.items() if v != "auto"}

    def _user_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        return self.compute_loss(model, batch)

    # ---- faults: preemption, a hung rank ----

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``, ending the process cleanly on the faults of a cluster job.

        - SIGTERM/SIGUSR1 (preemption: slurm, Kubernetes): every rank finishes its step, the checkpoint
          is saved through the Trainer's own save path (``checkpoint-N`` with ``zo/``), and the process
          exits with code 4 (:attr:`~subzero_ds.faults.ExitCode.PREEMPTED`); the requeued script continues
          with ``train(resume_from_checkpoint=True)``.
        - A collective that waits longer than ``subzero.collective_timeout`` for another rank: every live
          rank prints one message (the step, the last checkpoint) and exits with code 5.

        Takes and returns what ``Trainer.train`` does.
        """
        watch = _FaultWatch()
        self.add_callback(watch)
        timeout = self.zo_engine.config.collective_timeout
        try:
            with PreemptionSignals() as watch.signals, stop_on_collective_timeout(
                    watch.activity, timeout, lambda: _last_trainer_checkpoint(self.args.output_dir),
                    "call trainer.train(resume_from_checkpoint=True)"):
                output = super().train(*args, **kwargs)
        except CollectiveTimeoutError as error:
            print(f"ZOTrainer: error: {error}", file=sys.stderr, flush=True)
            exit_process(ExitCode.COLLECTIVE_TIMEOUT)
        finally:
            self.remove_callback(watch)
        if watch.signal_name is not None:
            checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if is_local_main_process():  # printed: a script's logging may not show INFO
                print(f"ZOTrainer: {watch.signal_name} received: stopped after step {self.state.global_step} and "
                      f"saved {checkpoint}. Run the script again with trainer.train(resume_from_checkpoint=True) to "
                      "continue.", file=sys.stderr, flush=True)
            barrier()  # the group is healthy: every rank leaves together
            exit_process(ExitCode.PREEMPTED)
        return output

    # ---- the step ----

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """A stand-in optimizer over one dummy tensor: it carries the scheduled learning rate only."""
        if self.optimizer is None:
            self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=self.zo_engine.config.lr)
        return self.optimizer

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None):
        """The engine wraps the model already: create the stand-in optimizer and the schedule, and resume."""
        self.create_optimizer()
        self.create_scheduler(num_training_steps=max_steps, optimizer=self.optimizer)
        if resume_from_checkpoint is not None:
            self.zo_engine.load_checkpoint(Path(resume_from_checkpoint) / ZO_CHECKPOINT_DIR)
            self._load_optimizer_and_scheduler(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return self.model, train_dataloader

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """The method's probes on this micro-batch (and, at the window's end, the update). No backward."""
        self.zo_engine.learning_rate = self.optimizer.param_groups[0]["lr"]
        result = self.zo_engine.step(inputs)
        loss = result.loss / self.args.gradient_accumulation_steps  # the Trainer sums micro-batch losses
        return torch.tensor(loss, device=self.args.device)

    def _clip_grad_norm(self, model: torch.nn.Module) -> None:
        return None  # no gradients

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> None:
        return None

    def _wrap_model(self, model: torch.nn.Module, training: bool = True, dataloader: Any = None):
        return self.zo_engine.ds_engine  # ZeRO-3's hooks are on it; never DataParallel/DDP

    # ---- checkpoints and weights ----

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's scheduler state, and our sharded ZO checkpoint in ``output_dir/zo/`` (every rank writes its shards)."""
        self.zo_engine.save_checkpoint(Path(output_dir) / ZO_CHECKPOINT_DIR, keep_last=1)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, "scheduler.pt")):
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Weights come back from the ZO checkpoint in :meth:`_prepare_for_training`, shard by shard."""

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:  # ZO directions never use the global RNG; the data order may
            super()._load_rng_state(checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Weights ``from_pretrained`` loads (gathered; rank 0 writes), or a PEFT model's adapter.

        Collective: every rank calls it. Checkpoints (internal calls) skip the gathered weights:
        the ZO checkpoint beside them holds every shard.
        """
        output_dir = output_dir or self.args.output_dir
        if _internal_call:
            if self.args.should_save:
                Path(output_dir).mkdir(parents=True, exist_ok=True)
                getattr(self.model, "config", None) and self.model.config.save_pretrained(output_dir)
            return
        from ..adapters import is_peft_model, save_adapter

        if is_peft_model(self.model):
            save_adapter(self.model, output_dir)
        else:
            self.zo_engine.save_pretrained(output_dir)
        if is_main_process() and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        barrier()


class _FaultWatch(TrainerCallback):
    """After each optimizer step every rank agrees whether any got a stop signal; if so the Trainer saves and stops.

    Also keeps :attr:`activity` (the step) for the message of a timed-out collective.
    """

    def __init__(self) -> None:
        self.signals: PreemptionSignals | None = None
        self.signal_name: str | None = None
        self.activity = Activity()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.activity.now = f"step {state.global_step + 1}"

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> TrainerControl:
        self.activity.now = f"the logging, evaluation or checkpoint after step {state.global_step}"
        if self.signals is not None and self.signal_name is None:
            self.signal_name = self.signals.agreed()  # collective: every rank asks after the same step
        if self.signal_name is not None:
            control.should_save = control.should_training_stop = True  # the Trainer's own save path, then stop
        return control


def _last_trainer_checkpoint(output_dir: str) -> str | None:
    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None


__all__ = ["ZOTrainer"]
