"""Integrations with the training tools most fine-tuning code already uses."""

from .trainer import ZOTrainer

__all__ = ["ZOTrainer"]
