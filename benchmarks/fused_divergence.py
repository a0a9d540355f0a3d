"""Forward + backward of a distillation JSD through both lm-heads: naive JAX, tiled, fused, Liger.

Each implementation computes the same scalar, the masked token mean of the generalized JSD
(β = 0.5, T = 1, float32) between softmax(h_t·W_t) and softmax(h_s·W_s), and its gradients with
respect to the student's hidden states h_s `[N, Hs]` and lm-head W_s:

  naive           logits h·W, then `kdjax.losses.generalized_jsd`, differentiated by jax.grad
  tiled           logits h·W, then `kdjax.kernels.tiled.tiled_divergence` (vocabulary tiles)
  fused           `kdjax.kernels.fused_linear.fused_linear_divergence` (no `[N, V]` logits)
  liger           Liger-Kernel's `LigerFusedLinearJSDLoss`, PyTorch on CPU, compiled=False
  liger_compiled  the same with compiled=True (torch.compile; its compile time is reported apart)

Time: min and median over `--repeats` runs after `--warmup` runs, each ended by
block_until_ready (JAX) or the return of `backward()` (PyTorch, synchronous on CPU).

Memory: for JAX, XLA's buffer assignment of the compiled step (`memory_analysis()`): temp is
everything beyond the arguments and outputs, peak = arguments + outputs + temp − aliased. It is
read from a compilation on abstract shapes before anything is allocated, so a configuration that
would not fit is skipped with its estimate. For PyTorch, each implementation runs in a fresh
subprocess; after the timed runs, glibc is made to return freed blocks to the system and the
kernel's peak-RSS mark is reset (/proc/self/clear_refs), and the growth of the peak over the RSS
before one more step is the step's memory (temp + gradients); peak = input bytes + that growth.

Throughput: the matmul FLOPs of one step, 2·N·V·(Hs + Ht) for both models' logits plus 4·N·V·Hs
for the two student gradient products, divided by the median time, and that as a fraction of a
plain matmul's FLOP/s measured in the same run (the logits-shaped product [n, Hs]·[Hs, V] and a
square one, whichever is faster). The machine's copy bandwidth (NumPy `copyto`, and a JAX `x + 1`
that reads and writes each byte once) is printed alongside: the elementwise part of every loss is
bound by it and by transcendentals, not by the matmul units.

Output: one JSON line per measurement, then a table of ratios against naive JAX per N.

  python benchmarks/fused_divergence.py                       # N = 1k..8k, Hs 2048, Ht 4096, V 128256
  python benchmarks/fused_divergence.py --hs 512 --ht 1024 --vocab 32000 --tokens 1024,2048,4096
  python benchmarks/fused_divergence.py --hs 256 --ht 512 --vocab 8000 --tokens 256,512 --repeats 5
  python benchmarks/fused_divergence.py --estimate-only                # memory estimates, nothing run
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

JAX_IMPLS = ("naive", "tiled", "fused")
TORCH_IMPLS = ("liger", "liger_compiled")
GIB = 2**30
BETA = 0.5
# Python interpreter, torch and its allocator pools, before any input exists (a generous guess).
TORCH_OVERHEAD_BYTES = 1 * GIB


def _emit(record: dict) -> dict:
  print(json.dumps(record), flush=True)
  return record


def _proc_kib_field(path: str, key: str) -> int:
  """A `key: N kB` line of a /proc file, in bytes."""
  with open(path) as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"no {key} in {path}")


def _available_bytes() -> int:
  return _proc_kib_field("/proc/meminfo", "MemAvailable")


def _fits(need: int, args) -> tuple[bool, str]:
  """Whether `need` bytes fit in the `--memory-fraction` of the memory available now, and why not."""
  budget = int(_available_bytes() * args.memory_fraction)
  reason = f"needs ~{need / GIB:.2f} GiB, budget {budget / GIB:.2f} GiB ({args.memory_fraction:g} of available)"
  return need <= budget, reason


def make_inputs(n: int, hs: int, ht: int, v: int, keep_fraction: float, seed: int) -> dict:
  """Hidden states ~ N(0, 1), heads [H, V] scaled to logits of standard deviation 3, a token mask.

  NumPy with a fixed seed, so that the PyTorch subprocess builds the very same numbers.
  """
  rng = np.random.default_rng(seed)

  def normal(shape, scale=1.0):
    x = rng.standard_normal(shape, dtype=np.float32)
    x *= scale
    return x

  return dict(
      student_hidden=normal((n, hs)),
      student_head=normal((hs, v), 3.0 / np.sqrt(hs)),
      teacher_hidden=normal((n, ht)),
      teacher_head=normal((ht, v), 3.0 / np.sqrt(ht)),
      keep=rng.random(n) < keep_fraction,
  )


def matmul_flops(n: int, hs: int, ht: int, v: int) -> int:
  """Matmul FLOPs of one forward + backward: both models' logits, then dL/dh_s and dL/dW_s."""
  return 2 * n * v * (hs + ht) + 4 * n * v * hs


def _time_calls(call, warmup: int, repeats: int) -> dict:
  """Wall times of `call()` (which must block until its result exists): first call, then repeats."""
  times = []
  for _ in range(warmup + repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  runs = times[warmup:]
  return dict(first_s=times[0], runs_s=runs, min_s=min(runs), median_s=statistics.median(runs))


# ------------------------------------------------------------------------------------------------
# Machine: copy bandwidth and matmul FLOP/s.


def measure_machine(args) -> dict:
  import jax
  import jax.numpy as jnp

  out = {}
  copy_bytes = args.copy_mib * 2**20
  src = np.ones(copy_bytes // 4, np.float32)
  dst = np.empty_like(src)
  timing = _time_calls(lambda: np.copyto(dst, src), 1, args.repeats)
  # A copy reads and writes every byte once.
  out["numpy_copy_GBps"] = 2 * copy_bytes / timing["min_s"] / 1e9
  del src, dst
  # Donated, so that the result reuses the input's buffer: a fresh one each call would time the
  # page faults of its first touch rather than the copy.
  add_one = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  state = {"x": jnp.ones(copy_bytes // 4, jnp.float32)}

  def add():
    state["x"] = add_one(state["x"]).block_until_ready()

  timing = _time_calls(add, 1, args.repeats)
  out["jax_copy_GBps"] = 2 * copy_bytes / timing["min_s"] / 1e9
  del state

  rows = min(args.tokens)
  shapes = {"logits_shaped": (rows, args.hs, args.vocab), "square": (args.matmul_size,) * 3}
  for name, (m, k, n) in shapes.items():
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    product = jax.jit(jnp.matmul)
    timing = _time_calls(lambda: product(a, b).block_until_ready(), 1, args.repeats)
    out[f"jax_matmul_{name}_GFLOPs"] = 2 * m * k * n / timing["min_s"] / 1e9
    out[f"matmul_{name}_shape"] = [m, k, n]
    del a, b
  if any(impl in args.impls for impl in TORCH_IMPLS):
    import torch

    out["torch_threads"] = torch.get_num_threads()
    for name, (m, k, n) in shapes.items():
      a, b = torch.ones((m, k)), torch.ones((k, n))
      timing = _time_calls(lambda: torch.matmul(a, b), 1, args.repeats)
      out[f"torch_matmul_{name}_GFLOPs"] = 2 * m * k * n / timing["min_s"] / 1e9
      del a, b
  out["jax_matmul_GFLOPs"] = max(out[f"jax_matmul_{name}_GFLOPs"] for name in shapes)
  if "torch_matmul_square_GFLOPs" in out:
    out["torch_matmul_GFLOPs"] = max(out[f"torch_matmul_{name}_GFLOPs"] for name in shapes)
  out["cpu_count"] = os.cpu_count()
  return out


# ------------------------------------------------------------------------------------------------
# JAX implementations.


def _jax_losses(args):
  """name -> scalar loss (h_s, W_s, h_t, W_t, keep) of each JAX implementation."""
  from kdjax import losses
  from kdjax.kernels.fused_linear import fused_linear_divergence
  from kdjax.kernels.terms import divergence
  from kdjax.kernels.tiled import tiled_divergence

  jsd = divergence("generalized_jsd", beta=BETA)

  def naive(hs, ws, ht, wt, keep):
    return losses.masked_mean(losses.generalized_jsd(hs @ ws, ht @ wt, beta=BETA, where=keep), keep)

  def tiled(hs, ws, ht, wt, keep):
    return losses.masked_mean(tiled_divergence(jsd, hs @ ws, ht @ wt, where=keep, tile=args.vocab_tile), keep)

  def fused(hs, ws, ht, wt, keep):
    values = fused_linear_divergence(jsd, hs, ws, ht, wt, where=keep, token_chunk=args.token_chunk,
                                     vocab_tile=args.vocab_tile)
    return losses.masked_mean(values, keep)

  return {"naive": naive, "tiled": tiled, "fused": fused}


def run_jax(n: int, args, machine: dict) -> list[dict]:
  import jax
  import jax.numpy as jnp

  impls = [name for name in JAX_IMPLS if name in args.impls]
  if not impls:
    return []
  shapes = dict(student_hidden=(n, args.hs), student_head=(args.hs, args.vocab), teacher_hidden=(n, args.ht),
                teacher_head=(args.ht, args.vocab))
  abstract = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes.values()]
  abstract.append(jax.ShapeDtypeStruct((n,), jnp.bool_))
  base = dict(tokens=n, hs=args.hs, ht=args.ht, vocab=args.vocab, flops=matmul_flops(n, args.hs, args.ht, args.vocab))

  # Compile everything on abstract shapes first: the memory estimate decides what may run.
  compiled, records = {}, []
  for name in impls:
    start = time.perf_counter()
    step = jax.jit(jax.value_and_grad(_jax_losses(args)[name], argnums=(0, 1)))
    executable = step.lower(*abstract).compile()
    stats = executable.memory_analysis()
    memory = dict(temp_bytes=stats.temp_size_in_bytes, arg_bytes=stats.argument_size_in_bytes,
                  out_bytes=stats.output_size_in_bytes,
                  peak_bytes=stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
                  - stats.alias_size_in_bytes)
    compiled[name] = (executable, memory, time.perf_counter() - start)

  if args.estimate_only:
    return [_emit(dict(impl=name, **base, **compiled[name][1], fits=_fits(compiled[name][1]["peak_bytes"], args)[0],
                       skipped="--estimate-only")) for name in impls]
  arg_bytes = next(iter(compiled.values()))[1]["arg_bytes"]
  smallest = min(memory["peak_bytes"] for _, memory, _ in compiled.values())
  ok, reason = _fits(smallest, args)
  if not ok:
    return [_emit(dict(impl=name, **base, **compiled[name][1], skipped=f"smallest JAX step {reason}"))
            for name in impls]
  data = make_inputs(n, args.hs, args.ht, args.vocab, args.keep_fraction, args.seed)
  inputs = [jnp.asarray(data[key]) for key in (*shapes, "keep")]
  del data
  gc.collect()

  for name in impls:
    executable, memory, compile_s = compiled[name]
    ok, reason = _fits(memory["peak_bytes"] - arg_bytes, args)  # the arguments exist already
    if not ok:
      records.append(_emit(dict(impl=name, **base, **memory, skipped=f"beyond the inputs it {reason}")))
      continue
    result = {}

    def call():
      result.pop("out", None)  # the previous gradients must not stay alive through this step
      result["out"] = jax.block_until_ready(executable(*inputs))

    try:
      timing = _time_calls(call, args.warmup, args.repeats)
    except Exception as error:  # noqa: BLE001 (an allocation failure must not end the whole benchmark)
      records.append(_emit(dict(impl=name, **base, **memory, skipped=f"failed: {type(error).__name__}: {error}")))
      continue
    loss = float(result.pop("out")[0])
    records.append(_emit(dict(impl=name, **base, **memory, **timing, compile_s=compile_s, loss=loss,
                              **_throughput(base["flops"], timing["median_s"], machine))))
    gc.collect()
  del inputs
  return records


def _throughput(flops: int, seconds: float, machine: dict) -> dict:
  achieved = flops / seconds / 1e9
  out = dict(achieved_GFLOPs=achieved, fraction_of_jax_matmul=achieved / machine["jax_matmul_GFLOPs"])
  if "torch_matmul_GFLOPs" in machine:
    out["fraction_of_torch_matmul"] = achieved / machine["torch_matmul_GFLOPs"]
  return out


# ------------------------------------------------------------------------------------------------
# Liger-Kernel (PyTorch), one fresh subprocess per implementation.


def _rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
  return _proc_kib_field("/proc/self/status", "VmHWM")


def _reset_peak_rss() -> bool:
  """Makes RSS follow the live heap, then resets the kernel's peak-RSS mark (Linux ≥ 4.0).

  glibc keeps freed blocks below its mmap threshold, which rises to 32 MiB as large blocks are
  freed, in the process: after a warm-up the step's temporaries would already be resident and
  the growth would read 0. A fixed 64 KiB threshold (which also stops the rise) returns every larger
  block to the system when freed, and malloc_trim hands back what is free now.

  Returns:
    False where either is not possible (no glibc, or /proc/self/clear_refs not writable).
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3  # from glibc's malloc.h
    if not libc.mallopt(m_mmap_threshold, 64 * 1024):
      return False
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def torch_worker(spec: dict) -> dict:
  """Runs in the subprocess: times Liger's loss + backward and measures its RSS growth."""
  import torch
  from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDLoss

  n = spec["tokens"]
  data = make_inputs(n, spec["hs"], spec["ht"], spec["vocab"], spec["keep_fraction"], spec["seed"])
  student_hidden = torch.from_numpy(data["student_hidden"]).requires_grad_(True)
  # Liger's heads are [V, H] (nn.Linear's layout).
  student_head = torch.from_numpy(np.ascontiguousarray(data["student_head"].T)).requires_grad_(True)
  teacher_hidden = torch.from_numpy(data["teacher_hidden"])
  teacher_head = torch.from_numpy(np.ascontiguousarray(data["teacher_head"].T))
  # Liger takes the mask as labels: ignore_index (−100) drops a token; with weight_hard_loss = 0 the
  # labels are used for nothing else.
  labels = torch.where(torch.from_numpy(data["keep"]), 0, -100)
  input_bytes = sum(x.nbytes for x in (student_hidden, student_head, teacher_hidden, teacher_head, labels))
  del data
  gc.collect()
  loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, temperature=1.0,
                                    compiled=spec["compiled"], chunk_size=spec["liger_chunk"])
  result = {}

  def call():
    student_hidden.grad = student_head.grad = None
    loss = loss_fn(student_hidden, student_head, teacher_hidden, teacher_head, labels)
    loss.backward()
    result["loss"] = float(loss)

  # The first call holds torch.compile's compilation when compiled=True.
  timing = _time_calls(call, spec["warmup"], spec["repeats"])
  student_hidden.grad = student_head.grad = None
  gc.collect()
  if _reset_peak_rss():
    method = "VmHWM growth over one step after warm-up (clear_refs, 64 KiB mmap threshold, malloc_trim)"
    before = _rss_bytes()
    call()
    growth = _peak_rss_bytes() - before
  else:
    method = "unavailable: no glibc mallopt or /proc/self/clear_refs not writable"
    growth = None
  out = dict(timing, loss=result["loss"], input_bytes=input_bytes, memory_method=method,
             torch_threads=torch.get_num_threads())
  if growth is not None:
    out.update(rss_growth_bytes=growth, peak_bytes=input_bytes + growth)
  return out


def _liger_estimate(n: int, args) -> int:
  """Rough bytes of a Liger step: inputs, gradients (Liger's own and autograd's copy of the head's),
  and about a dozen float32 [chunk, V] arrays of the per-chunk torch.func graph."""
  inputs = 4 * (n * (args.hs + args.ht) + args.vocab * (args.hs + args.ht))
  grads = 4 * (2 * n * args.hs + 2 * args.vocab * args.hs)
  chunk = min(args.liger_chunk, n)
  return TORCH_OVERHEAD_BYTES + inputs + grads + 12 * 4 * chunk * args.vocab


def run_torch(n: int, args, machine: dict) -> list[dict]:
  records = []
  base = dict(tokens=n, hs=args.hs, ht=args.ht, vocab=args.vocab, flops=matmul_flops(n, args.hs, args.ht, args.vocab))
  for name in (impl for impl in TORCH_IMPLS if impl in args.impls):
    ok, reason = _fits(_liger_estimate(n, args), args)
    if args.estimate_only:
      records.append(_emit(dict(impl=name, **base, estimate_bytes=_liger_estimate(n, args), fits=ok,
                                skipped="--estimate-only")))
      continue
    if not ok:
      records.append(_emit(dict(impl=name, **base, skipped=f"estimate {reason}")))
      continue
    spec = dict(tokens=n, hs=args.hs, ht=args.ht, vocab=args.vocab, keep_fraction=args.keep_fraction, seed=args.seed,
                compiled=name == "liger_compiled", liger_chunk=args.liger_chunk, warmup=args.warmup,
                repeats=args.repeats)
    try:
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--torch-worker", json.dumps(spec)],
                            capture_output=True, text=True, timeout=args.torch_timeout or None)
    except subprocess.TimeoutExpired:
      why = f"subprocess ran past --torch-timeout {args.torch_timeout} s"
      records.append(_emit(dict(impl=name, **base, skipped=why)))
      continue
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit status {proc.returncode}"
      records.append(_emit(dict(impl=name, **base, skipped=f"subprocess failed, {why}: {' | '.join(tail)}")))
      continue
    out = json.loads(lines[-1])
    if name == "liger_compiled":
      # The first call compiles; the steady-state median is what the kernel itself costs.
      out["compile_s"] = out["first_s"] - out["median_s"]
    records.append(_emit(dict(impl=name, **base, **out, **_throughput(base["flops"], out["median_s"], machine))))
  return records


# ------------------------------------------------------------------------------------------------
# Summary.


def _fmt_bytes(x):
  return "-" if x is None else f"{x / GIB:.3f}"


def _ratio(a, b):
  return "-" if a is None or b is None or b == 0 else f"{a / b:.3f}"


def summarize(records: list[dict], args) -> None:
  print()
  print(f"Hs={args.hs} Ht={args.ht} V={args.vocab}; ratios against naive JAX "
        "(memory ratios use naive's XLA estimate even where it was skipped)")
  header = ("N", "impl", "median s", "min s", "t/naive", "peak GiB", "peak/naive", "temp GiB", "temp/naive",
            "frac matmul", "loss rel.diff")
  print(" | ".join(f"{h:>12}" for h in header))
  for n in args.tokens:
    order = JAX_IMPLS + TORCH_IMPLS
    rows = sorted((r for r in records if r["tokens"] == n), key=lambda r: order.index(r["impl"]))
    naive = next((r for r in rows if r["impl"] == "naive"), {})
    # Every implementation computes the same loss: its spread checks them against each other.
    reference_loss = next((r["loss"] for r in rows if "loss" in r), None)
    for r in rows:
      temp = r.get("temp_bytes")
      if temp is None and "rss_growth_bytes" in r:
        # PyTorch: the step's RSS growth less the gradients it returns.
        temp = r["rss_growth_bytes"] - 4 * (n * args.hs + args.hs * args.vocab)
      loss_diff = "-"
      if "loss" in r and reference_loss:
        loss_diff = f"{abs(r['loss'] - reference_loss) / abs(reference_loss):.1e}"
      cells = (n, r["impl"], f"{r['median_s']:.4f}" if "median_s" in r else "skipped",
               f"{r['min_s']:.4f}" if "min_s" in r else "-", _ratio(r.get("median_s"), naive.get("median_s")),
               _fmt_bytes(r.get("peak_bytes")), _ratio(r.get("peak_bytes"), naive.get("peak_bytes")), _fmt_bytes(temp),
               _ratio(temp, naive.get("temp_bytes")),
               f"{r['fraction_of_jax_matmul']:.3f}" if "fraction_of_jax_matmul" in r else "-", loss_diff)
      print(" | ".join(f"{c:>12}" for c in cells))
  skipped = [r for r in records if "skipped" in r]
  for r in skipped:
    print(f"skipped N={r['tokens']} {r['impl']}: {r['skipped']}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--tokens", default="1024,2048,4096,8192", help="comma-separated token counts N")
  parser.add_argument("--hs", type=int, default=2048, help="student hidden size")
  parser.add_argument("--ht", type=int, default=4096, help="teacher hidden size")
  parser.add_argument("--vocab", type=int, default=128256)
  parser.add_argument("--impls", default=",".join(JAX_IMPLS + TORCH_IMPLS))
  parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--token-chunk", type=int, default=256, help="fused: tokens per chunk")
  parser.add_argument("--vocab-tile", type=int, default=4096, help="tiled and fused: vocabulary tile")
  parser.add_argument("--liger-chunk", type=int, default=1024, help="Liger's chunk_size")
  parser.add_argument("--keep-fraction", type=float, default=0.9, help="share of tokens the mask keeps")
  parser.add_argument("--memory-fraction", type=float, default=0.8,
                      help="run a configuration only if its estimate fits this share of the available memory")
  parser.add_argument("--copy-mib", type=int, default=512, help="array size of the bandwidth measurement")
  parser.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul measured")
  parser.add_argument("--torch-timeout", type=int, default=0, help="seconds per PyTorch subprocess (0: no limit)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--estimate-only", action="store_true",
                      help="print each configuration's memory estimate and whether it fits; run nothing")
  parser.add_argument("--torch-worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.torch_worker:
    print(json.dumps(torch_worker(json.loads(args.torch_worker))), flush=True)
    return
  args.tokens = [int(n) for n in args.tokens.split(",")]
  args.impls = args.impls.split(",")
  unknown = set(args.impls) - set(JAX_IMPLS + TORCH_IMPLS)
  if unknown:
    parser.error(f"unknown implementations {sorted(unknown)}; known: {JAX_IMPLS + TORCH_IMPLS}")
  if args.repeats < 5:
    print(f"note: --repeats {args.repeats} < 5, a quick check rather than a measurement", file=sys.stderr)

  import jax

  machine = dict(measurement="machine", device=str(jax.devices()[0]), jax=jax.__version__)
  if not args.estimate_only:
    machine = _emit(dict(machine, **measure_machine(args)))
  records = []
  for n in args.tokens:
    # PyTorch first, while this process holds no inputs.
    records += run_torch(n, args, machine)
    records += run_jax(n, args, machine)
  summarize(records, args)


if __name__ == "__main__":
  main()
