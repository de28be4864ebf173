"""srpo: a thin SRPO trainer on top of ``srpo_kernels.fused_srpo_loss`` (rollouts, verifiable rewards, routing,
self-teacher, EMA). ``srpo train --help`` documents every option."""
from .trainer import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
