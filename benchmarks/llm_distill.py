"""LLM distillation methods on Shakespeare, one results table: `benchmarks/results/llm_distill.md`.

Every method runs through the same entry (`kdjax.experiments.lm_kd`, `configs/shakespeare_kd.py`)
at equal compute: the same teacher (trained once), the same student architecture, initialisation,
data order and step count per seed, the same CE-only baseline (trained once per seed and shared
by all methods). For each method and seed the held-out (Julius Caesar, Twelfth Night) measurements
are: cross-entropy in nats/byte and perplexity, top-1 agreement with the teacher, forward KL and
TVD to the teacher, and 1 − TVD, the per-token speculative acceptance rate α of the student as a
draft for the teacher (DistillSpec); plus the KD student's training wall-clock, a sample from
seed 0, and the teacher-hacking monitor's proxy / golden history.

  python benchmarks/llm_distill.py                                  # all methods, 3 seeds (~1 h, 2 CPUs)
  python benchmarks/llm_distill.py --methods=kd_forward_kl,taid --seeds=1
  python benchmarks/llm_distill.py --runlocal --output=/tmp/x.md   # seconds-long version (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Optional

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import shakespeare_kd  # noqa: E402
from kdjax.distill import distillm  # noqa: E402,F401  (imported up front: a sweep must not pick up edits)
from flax import nnx  # noqa: E402

from kdjax import losses  # noqa: E402
from kdjax.data import lm_pipeline, shakespeare, teacher_cache, text_sources  # noqa: E402
from kdjax.distill import strategies  # noqa: E402
from kdjax.experiments import lm_kd  # noqa: E402
from kdjax.models import sampling, speculative  # noqa: E402
from kdjax.models.decoder import DecoderLM  # noqa: E402
from kdjax.train import sharding as sharding_lib, state as state_lib, step as step_lib  # noqa: E402

# name -> (the config's method argument, field overrides, what it is)
METHODS = {
    "kd_forward_kl": ("logit", {}, "0.1·CE + 0.9·KL(p ‖ q) on the data (Hinton; the README's main job)"),
    "kd_reverse_kl": ("logit", {"distill.divergence": "reverse_kl"},
                      "0.1·CE + 0.9·KL(q ‖ p) on the data (MiniLLM's divergence, off-policy)"),
    "kd_jsd": ("logit", {"distill.divergence": "generalized_jsd", "distill.divergence_kwargs": {"beta": 0.5}},
               "0.1·CE + 0.9·JSD(β=0.5) on the data (GKD's divergence, off-policy)"),
    "taid": ("taid", {}, "0.1·CE + 0.9·TAID (CE to the interpolated target, adaptive t from 0.4)"),
    "teacher_cache": ("teacher_cache", {}, "0.1·CE + 0.9·KL against a cached top-16 teacher (float16, bucket tail)"),
    "distillm": ("distillm", {}, "DistiLLM: skew KL (α=0.1), adaptive off-policy replay of student samples"),
    "seqkd": ("logit", {"on_policy.teacher_fraction": 1.0},
              "sequence-level KD: teacher-sampled continuations (T=0.9), 0.1·CE + 0.9·KL"),
    "gkd": ("gkd", {}, "GKD: JSD(β=0.5) only, λ=0.5 of the batches sampled from the student (T=0.9)"),
    "distillm2": ("distillm2", {}, "DistiLLM-2: SKL on teacher samples + SRKL on student samples (β=1)"),
    "minillm": ("minillm", {"distill.teacher_mix": 0.0, "distill.pt_weight": 0.0},
                "MiniLLM: sequence reverse KL by policy gradient on student samples (T=1)"),
    "minillm_mix": ("minillm", {}, "MiniLLM as in the paper: samples of 0.2·p + 0.8·q (importance-weighted), "
                                   "+ CE on the data (pre-training loss)"),
    "adaspec": ("adaspec", {}, "AdaSPEC: KL on the 40% of tokens the draft lags a KL-distilled reference most"),
    "distillspec_tvd_data": ("logit", {"distill.divergence": "total_variation", "distill.kd_weight": 1.0},
                             "DistillSpec: TVD(p, q) only (maximises α directly), on the data"),
    "distillspec_tvd_student": ("logit", {"distill.divergence": "total_variation", "distill.kd_weight": 1.0,
                                          "on_policy.student_fraction": 1.0},
                                "DistillSpec: TVD(p, q) only, on the student's own samples (T=0.9)"),
    "gkd_sft": ("gkd,sft_steps=400", {}, "GKD after a CE warm start: 400 CE steps, then 400 GKD steps"),
    "minillm_sft": ("minillm,sft_steps=400", {}, "minillm_mix after a CE warm start: 400 CE steps, then 400 MiniLLM steps"),
    "aligndistil": ("aligndistil", {}, "AlignDistil: KL to the teacher's logits extrapolated from the CE student's, "
                                      "β_t ∈ [1, 2] by their TVD"),
    "mgsr": ("mgsr", {}, "MGSR: SCRG-revised student rollouts (half the batches), DAC-KL + span correlation"),
    "ernie_tiny": ("ernie_tiny", {}, "ERNIE-Tiny: 4 stages (general KD → fine-tuned teacher → task data → + labels)"),
    "ddk": ("ddk", {}, "DDK: 0.1·CE + 0.9·KL with the genre mixture re-weighted by the student/teacher gap"),
    "miniplm": ("miniplm", {}, "MiniPLM: CE only, on the half of the corpus with the largest log p_T − log p_ref"),
    "miniplm_random": ("miniplm", {"difference_sampling.random": True},
                       "MiniPLM's control: CE only, on a random half of the corpus"),
    "traces_all": ("verified_sft", {"distill.mode": "all"}, "sequence-level KD: CE on every teacher trace (T=0.9)"),
    "verified_sft": ("verified_sft", {}, "CE on the teacher traces a spelling checker accepts (rejection sampling)"),
    "redi": ("redi", {}, "REDI: 400 steps CE on accepted traces, then 400 of REDI (rejected as negatives, α=0.8) "
                         "at learning rate 1e-4"),
    "redi_lr1e-3": ("redi,redi_lr=0.001", {}, "REDI as above with its stage at learning rate 1e-3"),
}


def _config(method: str, overrides: dict, *, seeds: int, runlocal: bool, data_dir: str):
  arg = f"method={method},num_seeds={seeds}" + (",runlocal" if runlocal else "")
  config = shakespeare_kd.get_config(arg)
  with config.unlocked():
    config.data.data_dir = data_dir
    for path, value in overrides.items():
      *parents, leaf = path.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = value
  return config


def _share(workdir: str, shared: str, seeds: int) -> None:
  """Links the teacher and the CE-only students of `shared` into a method's workdir: every method
  then compares against the very same baseline runs, trained once."""
  os.makedirs(workdir, exist_ok=True)
  for name in ["teacher"] + [f"student_ce_seed{s}" for s in range(seeds)]:
    os.makedirs(os.path.join(shared, name), exist_ok=True)
    link = os.path.join(workdir, name)
    if not os.path.lexists(link):
      os.symlink(os.path.abspath(os.path.join(shared, name)), link)


def _stat(values: list[float], digits: int = 4, sign: str = "") -> str:
  mean = f"{statistics.fmean(values):{sign}.{digits}f}"
  return mean if len(values) < 2 else f"{mean} ± {statistics.stdev(values):.{digits}f}"


def _row(name: str, runs: list[dict], baseline: list[dict], description: str) -> str:
  column = lambda key, digits=4: _stat([r[key] for r in runs], digits)  # noqa: E731
  gains = [b["ce"] - r["ce"] for b, r in zip(baseline, runs)]
  wins = sum(g > 0 for g in gains)
  seconds = statistics.fmean(r["train_seconds"] for r in runs)
  return (f"| {name} | {column('ce')} | {_stat(gains, sign='+')} ({wins}/{len(gains)}) | {column('perplexity', 3)} | "
          f"{column('teacher_agreement', 3)} | {column('kl_to_teacher')} | "
          f"{_stat([1 - r['tvd_to_teacher'] for r in runs], 3)} | {seconds:.0f} | {description} |")


def _method_facts(results: dict) -> list[str]:
  """Measurements only some methods have: the spelling checker's pass rates (verified traces),
  DDK's final genre weights, ERNIE-Tiny's fine-tuned teacher."""
  lines = []
  traced = {name: r for name, r in results.items() if "pass_rate" in r["student_kd"][0]}
  if traced:
    first = next(iter(traced.values()))
    lines += ["", "## Verified teacher traces: the spelling checker's pass rate", "",
              "Share of continuations (T = 0.9, 49 bytes after 16-byte held-out prompts, 64 rows) whose every complete "
              "word occurs in the training text, and the share of valid words; held-out text itself passes about "
              "3/4 of the time (its names are not in the training word list).", "",
              "| model | pass rate | valid words |", "|---|---|---|",
              f"| teacher | {first['teacher']['pass_rate']:.3f} | {first['teacher']['valid_word_rate']:.3f} |",
              f"| CE only | {_stat([r['pass_rate'] for r in first['student_ce']], 3)} | "
              f"{_stat([r['valid_word_rate'] for r in first['student_ce']], 3)} |"]
    lines += [f"| {name} | {_stat([x['pass_rate'] for x in r['student_kd']], 3)} | "
              f"{_stat([x['valid_word_rate'] for x in r['student_kd']], 3)} |" for name, r in traced.items()]
  for name, r in results.items():
    history = r["student_kd"][0].get("source_history")
    if history and "weights" in history[-1]:
      domains = sorted(set(shakespeare.GENRES.values()))
      lines += ["", f"{name}: genre weights ({', '.join(domains)}) at step {history[0]['step']}: "
                f"{', '.join(f'{w:.3f}' for w in history[0]['weights'])}; at step {history[-1]['step']}: "
                f"{', '.join(f'{w:.3f}' for w in history[-1]['weights'])} (seed 0; the student/teacher perplexity "
                f"ratios then: {', '.join(f'{g:.3f}' for g in history[-1]['gap'])})."]
    if "finetuned_teacher" in r:
      lines += ["", f"{name}: the teacher fine-tuned on the task genres reaches val CE "
                f"{r['finetuned_teacher']['ce']:.4f} nats/byte (the general teacher {r['teacher']['ce']:.4f})."]
  return lines


def write_report(results: dict, path: str, *, args, speculative: Optional[dict] = None,
                 step_times: Optional[dict] = None) -> str:
  first = next(iter(results.values()))
  teacher, baseline = first["teacher"], first["student_ce"]
  lines = [
      "# LLM distillation on Shakespeare: every method at equal compute",
      "",
      f"Generated by `python benchmarks/llm_distill.py{' --runlocal' if args.runlocal else ''} "
      f"--seeds={args.seeds}` on {args.machine} ({time.strftime('%Y-%m-%d')}). Byte-level models (vocabulary 256); "
      f"held-out text: Julius Caesar and Twelfth Night ({int(teacher['eval_tokens']):,} bytes). Each student: "
      f"the same architecture, initialisation, data order and step count per seed; the CE-only baseline and the "
      f"teacher are shared by all rows. Mean ± sample std over seeds; gain = CE-only val CE − method's val CE "
      f"(paired by seed; in parentheses, seeds where the method won). α = 1 − TVD(p, q) is the per-token "
      f"acceptance rate of the student as a speculative draft for the teacher (temperature 1). \"train s\" is "
      f"the KD students' mean wall-clock; other jobs shared the two cores during parts of the sweep, so it is "
      f"indicative only (the cache's step time below is measured in one process).",
      "",
      f"Teacher: {teacher['num_params']:,} parameters, val CE {teacher['ce']:.4f} nats/byte (perplexity "
      f"{teacher['perplexity']:.3f}). Students: {baseline[0]['num_params']:,} parameters.",
      "",
      "| method | val CE (nats/byte) | gain over CE-only | perplexity | top-1 agreement | KL(p‖q) | α = 1 − TVD | "
      "train s (KD student) | what |",
      "|---|---|---|---|---|---|---|---|---|",
      _row("CE only (no teacher)", baseline, baseline, "cross-entropy on the data"),
  ]
  lines += [_row(name, r["student_kd"], baseline, METHODS[name][2]) for name, r in results.items()]
  cache = results.get("teacher_cache", {}).get("teacher_cache")
  if cache:
    lines += ["", f"Offline teacher cache: top-{cache['k']} {cache['value_dtype']} logits + float32 normaliser and "
              f"tail per byte, {cache['bytes'] / 2**20:.1f} MiB for the training split ({cache['bytes_per_token']:.1f} "
              f"bytes/token), built in {cache['build_seconds']:.1f} s."]
    if step_times:
      lines.append(f"Step time of the KD student (batch reading included, alternating blocks in one process): "
                   f"{step_times['cache'] * 1e3:.0f} ms with the cache vs {step_times['online'] * 1e3:.0f} ms with "
                   f"the teacher run in the step ({step_times['cache'] / step_times['online']:.2f}x).")
  if speculative:
    lines += ["", "## Speculative decoding (seed-0 students as drafts for the teacher)", "",
              "γ = 4 draft tokens per target call, exact rejection sampling at T = 1 (the output distribution is "
              "the teacher's), 8 held-out prompts of 16 bytes, 32 new bytes; median of 3 timed runs. On this CPU the "
              "draft costs a large share of a target call, so tokens per call is the transferable figure.", "",
              "| method | draft | tokens per target call | wall-clock speed-up vs teacher alone |", "|---|---|---|---|"]
    for name, by_draft in speculative.items():
      for draft, values in by_draft.items():
        label = "CE-only student" if draft.startswith("student_ce") else "distilled student"
        if draft.startswith("student_ce") and name != next(iter(speculative)):
          continue  # the same CE-only draft in every method's workdir
        lines.append(f"| {name if label != 'CE-only student' else 'CE only'} | {label} | "
                     f"{values['tokens_per_call']:.3f} | {values['speedup']:.2f}x |")
  lines += _method_facts(results)
  lines += ["", "## Teacher-hacking monitor (seed 0)", "",
            "Proxy: forward KL(teacher ‖ student) on fixed training windows; golden: CE on fixed held-out windows "
            "(nats/byte). Hacking would show as the proxy falling while the golden metric rises.", "",
            "| method | proxy at 25 / 50 / 75 / 100 % | golden at 25 / 50 / 75 / 100 % | first step proxy ↓ golden ↑ |",
            "|---|---|---|---|"]
  runs = [("CE only", baseline[0])] + [(name, r["student_kd"][0]) for name, r in results.items()]
  for name, run in runs:
    history = run.get("monitor", {}).get("history", [])
    if not history:
      continue
    picks = [history[min(len(history) - 1, max(0, math.ceil(len(history) * f) - 1))] for f in (0.25, 0.5, 0.75, 1.0)]
    proxy = " / ".join(f"{h['proxy_kl_train']:.3f}" for h in picks)
    golden = " / ".join(f"{h['golden_ce_val']:.3f}" for h in picks)
    lines.append(f"| {name} | {proxy} | {golden} | {run['monitor']['hacking_onset']} |")
  lines += ["", "## Samples (seed 0, temperature 0.8)", "", f"Prompt: `{first['sample_prompt']!r}`", "",
            f"- teacher: `{teacher.get('sample', '')!r}`", f"- CE only: `{baseline[0].get('sample', '')!r}`"]
  lines += [f"- {name}: `{r['student_kd'][0].get('sample', '')!r}`" for name, r in results.items()]
  text = "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--runlocal", action="store_true", help="the configs' seconds-long variant")
  parser.add_argument("--workdir", default="workdir/llm_distill")
  parser.add_argument("--data-dir", default="", help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                        "llm_distill.md"))
  parser.add_argument("--machine", default="this project's 2-core CPU machine (no GPU)")
  parser.add_argument("--speculative", action=argparse.BooleanOptionalAction, default=True,
                      help="time speculative decoding with the seed-0 students as drafts")
  args = parser.parse_args()
  methods = [m for m in args.methods.split(",") if m]  # --methods= (none): rebuild the report from the workdir
  unknown = set(methods) - set(METHODS)
  if unknown:
    raise SystemExit(f"unknown methods {sorted(unknown)}; known: {sorted(METHODS)}")
  shared = os.path.join(args.workdir, "shared")
  results, report = {}, ""
  for name in methods:
    method, overrides, _ = METHODS[name]
    workdir = os.path.join(args.workdir, name)
    _share(workdir, shared, args.seeds)
    started = time.perf_counter()
    results[name] = lm_kd.run(_config(method, overrides, seeds=args.seeds, runlocal=args.runlocal,
                                      data_dir=args.data_dir), workdir, log=print)
    print(json.dumps({"method": name, "seconds": round(time.perf_counter() - started, 1),
                      "val_ce": [r["ce"] for r in results[name]["student_kd"]]}), flush=True)
    # Rewritten after every method, from every method's results.json in the workdir: an interrupted
    # sweep still leaves its finished rows, and a sweep of a few methods adds to the earlier ones.
    report = write_report(_finished(args.workdir), args.output, args=args)
  finished = _finished(args.workdir)
  if args.speculative:
    speculative_results = {name: _speculative(args.workdir, name, args) for name in finished}
    times = _step_times(args.workdir, args) if "teacher_cache" in finished else None
    report = write_report(finished, args.output, args=args, speculative=speculative_results, step_times=times)
  print(report)


def _speculative(workdir: str, name: str, args) -> dict:
  """Speculative decoding with the seed-0 students as drafts for the teacher: measured tokens per
  target call and wall-clock speed-up over target-only decoding (γ = 4, 8 held-out prompts of 16
  bytes, 32 new bytes, T = 1). Cached in `workdir/name/speculative.json`."""
  path = os.path.join(workdir, name, "speculative.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  method, overrides, _ = METHODS[name]
  config = _config(method, overrides, seeds=args.seeds, runlocal=args.runlocal, data_dir=args.data_dir)
  run_dir = os.path.join(workdir, name)
  teacher = lm_kd.restore_model(config, run_dir, "teacher")
  tokens = text_sources.load_split_tokens(config.data.name, config.data.eval_split,
                                          data_dir=config.data.data_dir or text_sources.default_data_dir())
  prompts = np.stack([tokens[i * 997:i * 997 + 16] for i in range(8)]).astype(np.int32)
  sampler = sampling.SamplingConfig(max_new_tokens=min(32, config.data.seq_len - 16), temperature=1.0)
  out = {}
  for draft_name in ("student_ce_seed0", "student_kd_seed0"):
    draft = lm_kd.restore_model(config, run_dir, draft_name)
    timing = speculative.benchmark_speedup(teacher.graphdef, teacher.params, draft.graphdef, draft.params, prompts,
                                           None, jax.random.PRNGKey(0), gamma=4, config=sampler, repeats=3)
    out[draft_name] = {"tokens_per_call": float(timing.tokens_per_call), "speedup": float(timing.speedup),
                       "speculative_s": list(timing.speculative_s), "target_s": list(timing.target_s)}
  with open(path, "w") as f:
    json.dump(out, f)
  return out


def _step_times(workdir: str, args, *, steps: int = 20, rounds: int = 3) -> dict:
  """Seconds per training step of the KD student with the teacher run in the step (kd_forward_kl)
  and with the offline cache (teacher_cache), batch reading included, in alternating blocks of
  `steps` in one process (so both see the same machine load). Cached in `teacher_cache/step_times.json`."""
  path = os.path.join(workdir, "teacher_cache", "step_times.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = _config("teacher_cache", {}, seeds=1, runlocal=args.runlocal, data_dir=args.data_dir)
  teacher = lm_kd.restore_model(config, os.path.join(workdir, "teacher_cache"), "teacher")
  cache_dir = next(os.path.join(workdir, "teacher_cache", d) for d in sorted(os.listdir(os.path.join(
      workdir, "teacher_cache"))) if d.startswith("teacher_cache_k"))
  tokens = text_sources.load_split_tokens(config.data.name, config.data.train_split,
                                          data_dir=config.data.data_dir or text_sources.default_data_dir())
  mesh = sharding_lib.make_mesh(config.mesh.to_dict())
  student_cfg = lm_kd._model_config(config.student.model, vocab_size=256, seq_len=config.data.seq_len)
  cached = strategies.strategy_from_config(config.distill, vocab_size=256)
  online = strategies.LogitDistillation(losses.forward_kl, kd_weight=0.9)
  runs = {}
  for name, strategy, features in (("online", online, None), ("cache", cached, teacher_cache.CachedTeacher(cache_dir))):
    graphdef, params = state_lib.create_sharded_model(lambda: DecoderLM(student_cfg, rngs=nnx.Rngs(0)), mesh)
    optimizer = lm_kd.make_optimizer(config.student.train)
    state = state_lib.create_train_state(params, optimizer, 0, mesh)
    step = step_lib.make_distill_step(state=state, teacher_params=teacher.params, mesh=mesh,
                                      student_forward=step_lib.lm_forward(graphdef),
                                      teacher_forward=step_lib.lm_forward(teacher.graphdef), strategy=strategy,
                                      optimizer=optimizer)
    batches = iter(lm_pipeline.make_lm_dataset(tokens, seq_len=config.data.seq_len,
                                               batch_size=config.student.train.batch_size, seed=0, shuffle=True,
                                               num_epochs=None, window_features=features))
    runs[name] = {"state": step(state, sharding_lib.shard_batch(next(batches), mesh), teacher.params)[0],
                  "step": step, "batches": batches, "seconds": []}  # the first call compiles
  for _ in range(rounds):
    for run in runs.values():
      began = time.perf_counter()
      for _ in range(steps):
        run["state"], metrics = run["step"](run["state"], sharding_lib.shard_batch(next(run["batches"]), mesh),
                                             teacher.params)
      float(metrics["loss"][0])
      run["seconds"].append((time.perf_counter() - began) / steps)
  out = {name: statistics.median(run["seconds"]) for name, run in runs.items()}
  with open(path, "w") as f:
    json.dump(out, f)
  return out


def _finished(workdir: str) -> dict:
  """The results of every method (in table order) whose run in `workdir` finished."""
  out = {}
  for name in METHODS:
    path = os.path.join(workdir, name, "results.json")
    if os.path.exists(path):
      with open(path) as f:
        out[name] = json.load(f)["results"]
  return out


if __name__ == "__main__":
  main()
