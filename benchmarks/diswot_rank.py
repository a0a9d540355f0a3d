r"""DisWOT on digits: does a training-free teacher-student similarity rank students by distilled accuracy?

  python benchmarks/diswot_rank.py --workdir=/tmp/diswot_rank   # writes benchmarks/results/diswot.md

For each candidate student (CIFAR ResNets 8/14/20, ResNet-8×4, WRN-16-1/2, VGG-8, MobileNetV2, all from
`kdjax.models.vision`) and seed: the DisWOT distance (`kdjax.evaluate.diswot`, one batch of 64
training digits) of the network *at its initialisation*, against (a) the trained teacher and (b) the
teacher at initialisation (the paper's search compares untrained networks); then the same network is
distilled from the teacher (configs/vision_kd.py's KD recipe: 0.1·CE + 0.9·KD at T = 4, SGD, cosine)
for a short fixed budget and tested on the 360 held-out digits. Reported: Kendall τ and Spearman ρ
(with p-values, over candidates, seeds averaged) between score (−distance) and KD accuracy, the same
for the parameter count (a naive proxy), and the seed-to-seed τ of the accuracies themselves (how
much ranking signal the budget leaves to predict).

Everything checkpoints in the workdir and a rerun restores finished runs. About 20 minutes on 2
busy CPU cores (23 min measured; most of it compiling the 17 training steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from flax import nnx
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from configs import vision_kd as vision_config  # noqa: E402
from kdjax.data import image_pipeline  # noqa: E402
from kdjax.distill import representation  # noqa: E402
from kdjax.evaluate import diswot  # noqa: E402
from kdjax.experiments import vision_kd  # noqa: E402
from kdjax.models.vision import registry  # noqa: E402
from kdjax.train import sharding as sharding_lib  # noqa: E402

CANDIDATES = ("resnet8", "resnet14", "resnet20", "resnet8x4", "wrn_16_1", "wrn_16_2", "vgg8", "mobilenetv2")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "diswot.md")


def _correlations(x, y) -> dict:
  tau, tau_p = stats.kendalltau(x, y)
  rho, rho_p = stats.spearmanr(x, y)
  return {"tau": float(tau), "tau_p": float(tau_p), "rho": float(rho), "rho_p": float(rho_p)}


def _fmt(c: dict) -> str:
  return f"{c['tau']:+.2f} (p = {c['tau_p']:.2f}) | {c['rho']:+.2f} (p = {c['rho_p']:.2f})"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="/tmp/diswot_rank")
  parser.add_argument("--teacher", default="resnet32")
  parser.add_argument("--candidates", default=",".join(CANDIDATES))
  parser.add_argument("--steps", type=int, default=200, help="KD steps of every student (the teacher trains 3×)")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--batch", type=int, default=64, help="images DisWOT scores on")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  t0 = time.perf_counter()
  log = lambda s: print(f"{time.perf_counter() - t0:7.1f}s {s}", flush=True)  # noqa: E731
  candidates = args.candidates.split(",")
  config_of = lambda student: vision_config.get_config(  # noqa: E731
      f"method=kd,dataset=digits,teacher={args.teacher},student={student},steps={args.steps}")
  config = config_of(candidates[0])
  with config.unlocked():
    for role in ("teacher", "student"):
      config[role].train.tensorboard = False
  data = vision_kd.load_data(config)
  info = data.info
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  common = dict(data=data, config=config, mesh=mesh, workdir=args.workdir, log=log)
  ce_only = representation.RepresentationDistillation()
  teacher = vision_kd.train_classifier(name="teacher", model_cfg=config.teacher.model, train_cfg=config.teacher.train,
                                       seed=config.teacher.seed, strategy=ce_only, teacher=None, **common)
  teacher_accuracy = vision_kd.evaluate([teacher], None, data, batch_size=config.eval.batch_size, mesh=mesh)["accuracy"]
  log(f"teacher {args.teacher}: test accuracy {100 * teacher_accuracy:.2f}%")
  images = image_pipeline.normalize(data.train_images[:args.batch], info.mean, info.std)
  def build(name, seed):
    return registry.vision_model(name, num_classes=info.num_classes, rngs=nnx.Rngs(seed), input_shape=info.image_shape)
  trained_teacher = (teacher.graphdef, teacher.params, teacher.model_state)
  untrained_teacher = build(args.teacher, config.teacher.seed)
  teacher_shapes = registry.activation_shapes(untrained_teacher, info.image_shape)
  rows = []
  for name in candidates:
    cfg = config_of(name)
    student_shapes = registry.activation_shapes(nnx.eval_shape(lambda: build(name, 0)), info.image_shape)
    strategy = representation.representation_strategy(
        cfg.distill.to_dict(), student_shapes=student_shapes, teacher_shapes=teacher_shapes,
        num_steps=cfg.student.train.steps, train_labels=data.train_labels, num_classes=info.num_classes)
    row = {"name": name, "seeds": []}
    for seed in range(args.seeds):
      student = build(name, seed)  # the very initialisation the KD run below starts from
      row["num_params"] = registry.count_params(student)
      vs_trained = diswot.diswot_score(trained_teacher, student, images, teacher_train=False, student_train=True)
      vs_init = diswot.diswot_score(untrained_teacher, student, images, teacher_train=True, student_train=True)
      trained = vision_kd.train_classifier(name=f"{name}_kd_seed{seed}", model_cfg=cfg.student.model,
                                           train_cfg=config.student.train, seed=seed, strategy=strategy,
                                           teacher=[teacher], **common)
      metrics = vision_kd.evaluate([trained], [teacher], data, batch_size=config.eval.batch_size, mesh=mesh)
      row["seeds"].append({"seed": seed, "vs_trained": vs_trained, "vs_init": vs_init,
                           "accuracy": float(metrics["accuracy"]), "train_seconds": trained.train_seconds})
      log(f"[{name} seed {seed}] DisWOT distance {vs_trained['distance']:.4f} (teacher at init "
          f"{vs_init['distance']:.4f}), KD test accuracy {100 * metrics['accuracy']:.2f}%")
    mean = lambda key, part=None: statistics.fmean(  # noqa: E731
        s[key] if part is None else s[key][part] for s in row["seeds"])
    row.update(accuracy=mean("accuracy"), score=mean("vs_trained", "score"), score_init=mean("vs_init", "score"),
               score_std=statistics.stdev(s["vs_trained"]["score"] for s in row["seeds"]) if args.seeds > 1 else 0.0,
               semantic=mean("vs_trained", "semantic"), relation=mean("vs_trained", "relation"))
    rows.append(row)
  def predictors(subset):
    accuracy = [r["accuracy"] for r in subset]
    return {
        "score (trained teacher)": _correlations([r["score"] for r in subset], accuracy),
        "− semantic distance only": _correlations([-r["semantic"] for r in subset], accuracy),
        "− relation distance only": _correlations([-r["relation"] for r in subset], accuracy),
        "score (teacher at init)": _correlations([r["score_init"] for r in subset], accuracy),
        "parameter count": _correlations([r["num_params"] for r in subset], accuracy),
    }
  summary = predictors(rows)
  # A candidate that did not learn in the budget decides every rank correlation by itself; the
  # ranking among those that did (above half accuracy) is reported beside it.
  learned = [r for r in rows if r["accuracy"] > 0.5]
  summary_learned = predictors(learned) if 3 <= len(learned) < len(rows) else None
  if args.seeds >= 2:
    summary["seed 0 accuracy vs seed 1 accuracy"] = _correlations([r["seeds"][0]["accuracy"] for r in rows],
                                                                  [r["seeds"][1]["accuracy"] for r in rows])
    per_seed = [_correlations([r["seeds"][s]["vs_trained"]["score"] for r in rows],
                              [r["seeds"][s]["accuracy"] for r in rows]) for s in range(args.seeds)]
  seconds = time.perf_counter() - t0
  lines = [
      "# DisWOT: training-free student ranking vs distilled accuracy (digits)",
      "",
      f"`python benchmarks/diswot_rank.py --steps={args.steps} --seeds={args.seeds}` · teacher {args.teacher} "
      f"({100 * teacher_accuracy:.2f}% test accuracy, {config.teacher.train.steps} CE steps) · sklearn digits 8×8, "
      f"1437 train / 360 test · each student: KD (0.1·CE + 0.9·KD, T = 4) for {args.steps} steps of 64, "
      f"SGD 0.05 cosine · DisWOT on {args.batch} training images, students at initialisation (BatchNorm on batch "
      f"statistics), the trained teacher on its running statistics · {seconds / 60:.1f} min on 2 shared CPU cores.",
      "",
      "Score = −(semantic + relation distance), higher = predicted better (`kdjax.evaluate.diswot`); mean over "
      f"{args.seeds} seed(s), each seed scoring exactly the initialisation that its KD run then trains.",
      "",
      "| student | params | score (± std over seeds) | semantic d_s | relation d_r | score, teacher at init "
      "| KD test accuracy (%) | per seed (%) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for r in sorted(rows, key=lambda r: -r["score"]):
    lines.append(f"| {r['name']} | {r['num_params']:,} | {r['score']:.4f} ± {r['score_std']:.4f} | "
                 f"{r['semantic']:.4f} | "
                 f"{r['relation']:.4f} | {r['score_init']:.4f} | {100 * r['accuracy']:.2f} | "
                 + ", ".join(f"{100 * s['accuracy']:.2f}" for s in r["seeds"]) + " |")
  lines += ["", f"Rank correlation with the mean KD accuracy over the {len(rows)} candidates:", "",
            "| predictor | Kendall τ | Spearman ρ |", "|---|---|---|"]
  lines += [f"| {k} | {_fmt(v)} |" for k, v in summary.items()]
  if summary_learned is not None:
    lines += ["", f"The same over the {len(learned)} candidates that learned in the budget (mean accuracy > 50%: "
              + ", ".join(r["name"] for r in learned) + "):", "", "| predictor | Kendall τ | Spearman ρ |",
              "|---|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in summary_learned.items()]
  if args.seeds >= 2:
    lines += ["", "Per seed (score of that seed's initialisation vs that seed's accuracy): "
              + "; ".join(f"seed {s}: τ {c['tau']:+.2f} (p = {c['tau_p']:.2f})" for s, c in enumerate(per_seed))]
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "diswot_rank.json"), "w") as f:
    json.dump({"rows": rows, "summary": summary, "summary_learned": summary_learned, "seconds": seconds,
               "args": vars(args)}, f, indent=1, default=str)
  return {"rows": rows, "summary": summary}


if __name__ == "__main__":
  main()
