"""Evaluation during and after distillation: the teacher-hacking monitor (proxy vs golden metric)."""

from kdjax.evaluate.teacher_hacking import TeacherHackingMonitor

__all__ = ["TeacherHackingMonitor"]
