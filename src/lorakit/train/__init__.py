"""Training: the loop, LoRA+ optimizer groups, schedules, the memory-lean loss, checkpoints, torchrun.

``train(config)`` runs a whole job from a `TrainConfig` (model, data, adapter, loop); ``fit(model, data,
config, collate=...)`` trains a model you built yourself.
"""

from lorakit.train.config import TrainConfig, build_config
from lorakit.train.loop import fit
from lorakit.train.loss import causal_lm_loss_sum, chunked_head_cross_entropy
from lorakit.train.progress import TqdmProgress, TrainCallback
from lorakit.train.run import lora_config, train
from lorakit.train.state import TrainResult

__all__ = [
    "TqdmProgress",
    "TrainCallback",
    "TrainConfig",
    "TrainResult",
    "build_config",
    "causal_lm_loss_sum",
    "chunked_head_cross_entropy",
    "fit",
    "lora_config",
    "train",
]
