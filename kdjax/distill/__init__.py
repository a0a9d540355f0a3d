"""Distillation objectives: strategies `(student_out, teacher_out, batch, step) -> (loss, metrics)`
and schedules for their scalars (KD weight, temperature)."""

from kdjax.distill.schedules import make_schedule
from kdjax.distill.strategies import DIVERGENCES, LogitDistillation, divergence_by_name, strategy_from_config

__all__ = ["DIVERGENCES", "LogitDistillation", "divergence_by_name", "make_schedule", "strategy_from_config"]
