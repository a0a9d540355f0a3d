"""Progressive stages and warm starts of the `lm_kd` experiment (`kdjax.experiments.lm_kd.stages`)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from configs import shakespeare_kd
from kdjax.experiments import lm_kd


def _config(data_dir, arg="runlocal"):
  config = shakespeare_kd.get_config(arg)
  config.unlock()
  config.data.data_dir = data_dir
  config.data.train_split = "train[:4]"
  config.eval.sample.new_tokens = 0
  config.eval.max_batches = 1
  config.student.train.monitor_every = 0
  return config


def _leaves(model):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(model.params))]


def test_stage_config_replaces_distill_merges_sections_and_removes_none():
  config = shakespeare_kd.get_config("runlocal,method=distillm")
  stage = {"name": "sft", "steps": 8, "distill": {"divergence": None}, "on_policy": {"student_fraction": 0.5},
           "student": {"train": {"learning_rate": 0.5}}, "adaptive_off_policy": None}
  cfg = lm_kd.stage_config(config, stage)
  assert dict(cfg.distill) == {"divergence": None}  # replaced, not merged
  assert cfg.on_policy.student_fraction == 0.5 and cfg.on_policy.prompt_len == config.on_policy.prompt_len
  assert cfg.student.train.learning_rate == 0.5 and cfg.student.train.batch_size == config.student.train.batch_size
  assert cfg.student.train.steps == 8 and cfg.student.train.warmup_steps == 2  # warm-up capped at a quarter
  assert "adaptive_off_policy" not in cfg and "adaptive_off_policy" in config  # the original is untouched
  with pytest.raises(ValueError, match=r"unknown key on_policy.temprature"):
    lm_kd.stage_config(config, {"steps": 8, "on_policy": {"temprature": 1.0}})


@pytest.mark.parametrize("stages,message", [
    ([{"steps": 10}, {"steps": 10}], r"sum to 20 but student.train.steps is 30"),
    ([{"steps": 30, "optimiser": {}}], r"unknown keys \['optimiser'\]"),
    ([{"steps": 0}, {"steps": 30}], r"positive 'steps'"),
    ([{"steps": 30, "teacher": "finetuned"}], r"finetuned_teacher section"),
    ([{"steps": 30, "teacher": "big"}], r"'teacher' or 'finetuned'"),
])
def test_bad_stages_fail_before_training(stages, message):
  config = shakespeare_kd.get_config("runlocal")
  config.unlock()
  config.stages = stages
  with pytest.raises(ValueError, match=message):
    lm_kd.stages(config)


def test_bad_warm_start_arguments():
  with pytest.raises(ValueError, match=r"sft_steps must lie in \(0, 800\)"):
    shakespeare_kd.get_config("sft_steps=800")
  with pytest.raises(ValueError, match=r"already has stages"):
    shakespeare_kd.get_config("method=ernie_tiny,sft_steps=100")


def test_each_stage_starts_from_the_last_and_init_from_starts_both_students(tmp_path, data_dir):
  """A stage with a zero learning rate ends where it started: the chain's final parameters then
  equal the previous stage's exactly. Likewise a run initialised from another run's student."""
  config = _config(data_dir)
  config.stages = [
      {"name": "sft", "steps": 20, "distill": {"divergence": None}},
      {"name": "frozen", "steps": 10, "student": {"train": {"learning_rate": 0.0}}},
  ]
  first = str(tmp_path / "first")
  results = lm_kd.run(config, first, log=lambda line: None)
  stage0 = lm_kd.restore_model(config, first, "student_kd_seed0_stage0_sft")
  final = lm_kd.restore_model(config, first, "student_kd_seed0")
  for a, b in zip(_leaves(stage0), _leaves(final)):
    np.testing.assert_array_equal(a, b)
  ce_student = lm_kd.restore_model(config, first, "student_ce_seed0")
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(stage0), _leaves(ce_student)))
  assert results["student_kd"][0]["train_seconds"] > 0

  # init_from: both students of a new run start from the first run's CE-only student.
  config.stages = []
  config.student.init_from = str(tmp_path / "first" / "student_ce_seed0")
  config.student.train.learning_rate = 0.0
  config.teacher.checkpoint = str(tmp_path / "first" / "teacher")  # and the teacher is the first run's, untrained here
  second = str(tmp_path / "second")
  lines = []
  again = lm_kd.run(config, second, log=lines.append)
  assert f"[teacher] restored from {config.teacher.checkpoint}" in lines
  assert not os.path.exists(os.path.join(second, "teacher"))
  assert again["teacher"]["ce"] == results["teacher"]["ce"]
  for name in ("student_ce_seed0", "student_kd_seed0"):
    for a, b in zip(_leaves(ce_student), _leaves(lm_kd.restore_model(config, second, name))):
      np.testing.assert_array_equal(a, b)

  # A run of another architecture (the teacher) cannot start the student: named before any training.
  config.student.init_from = str(tmp_path / "first" / "teacher")
  with pytest.raises(ValueError, match=r"does not hold parameters of the student's architecture"):
    lm_kd.run(config, str(tmp_path / "third"), log=lambda line: None)


def test_init_from_without_a_checkpoint_names_the_problem(tmp_path, data_dir):
  config = _config(data_dir)
  config.student.init_from = str(tmp_path / "elsewhere")
  (tmp_path / "elsewhere").mkdir()
  with pytest.raises(FileNotFoundError, match=r"no (usable )?checkpoint in"):
    lm_kd.run(config, str(tmp_path / "run"), log=lambda line: None)


def test_a_missing_teacher_checkpoint_names_the_fix(tmp_path, data_dir):
  config = _config(data_dir)
  config.teacher.checkpoint = str(tmp_path / "no_teacher_here")
  with pytest.raises(FileNotFoundError, match=r"does not exist: point it at a teacher run directory"):
    lm_kd.run(config, str(tmp_path / "run"), log=lambda line: None)
  (tmp_path / "empty").mkdir()
  config.teacher.checkpoint = str(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match=r"holds no checkpoint"):
    lm_kd.run(config, str(tmp_path / "run"), log=lambda line: None)
