r"""RepDistiller / mdistiller's CIFAR-100 teacher→student pairs, for users with the data.

Launch (one accelerator; the published recipe is 240 epochs, batch 64, SGD lr 0.05 ×0.1 at
epochs 150 / 180 / 210, weight decay 5e-4, random crop (pad 4) + flip; about 1–3 h per run on a
modern GPU for the ResNet pairs):

  python -m kdjax.main --config=configs/cifar100_kd.py:pair=resnet32x4-resnet8x4,method=crd \
      --workdir=workdir/cifar100/resnet32x4-resnet8x4

Data: the TFDS catalogue's `cifar100`, prepared once in array_record format
(`tfds build cifar100 --file_format=array_record --data_dir=$TFDS_DATA_DIR`; the experiment never
downloads). `:runlocal` swaps in `mock_cifar100` (synthetic images of CIFAR-100's shape and class
count, kdjax.data.image_sources) and a few steps: the CI check that every pair and method builds
and trains.

Expected (RepDistiller / mdistiller, top-1 %; student alone → method): resnet32x4→resnet8x4 72.50 →
KD 73.33, FitNet 73.50, AT 73.44, RKD 71.90, PKT 73.64, CRD 75.51, DKD 76.32 (teacher 79.42);
resnet56→resnet20 69.06 → KD 70.66, FitNet 69.21, AT 70.55, RKD 69.61, CRD 71.16, DKD 71.97 (teacher
72.34). Teachers are trained here from scratch with the same recipe (`teacher.checkpoint`-style
reuse: the teacher run in the workdir is trained once and shared by every method of a pair).
"""

import ml_collections

from configs import vision_methods
from kdjax.config_args import parse_arg

# RepDistiller's pairs (teacher, student) of its CIFAR-100 tables.
PAIRS = {
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4"),
    "resnet56-resnet20": ("resnet56", "resnet20"),
    "resnet110-resnet32": ("resnet110", "resnet32"),
    "wrn_40_2-wrn_16_2": ("wrn_40_2", "wrn_16_2"),
    "wrn_40_2-wrn_40_1": ("wrn_40_2", "wrn_40_1"),
    "vgg13-vgg8": ("vgg13", "vgg8"),
    "resnet32x4-mobilenetv2": ("resnet32x4", "mobilenetv2"),
}
# 50000 training images at batch 64.
STEPS_PER_EPOCH = 782


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, pair="resnet32x4-resnet8x4", method="kd", seed=0, num_seeds=1, epochs=240)
  if arg.pair not in PAIRS:
    raise ValueError(f"unknown pair {arg.pair!r}; known: {sorted(PAIRS)}")
  teacher, student = PAIRS[arg.pair]
  config = ml_collections.ConfigDict()
  config.experiment = "vision_kd"
  config.name = arg.method
  config.seed = arg.seed
  config.num_seeds = arg.num_seeds
  steps = 4 if arg.runlocal else arg.epochs * STEPS_PER_EPOCH
  config.data = dict(name="mock_cifar100" if arg.runlocal else "cifar100", data_dir="",
                     train_split="train[:512]" if arg.runlocal else "train", eval_split="test[:256]" if arg.runlocal
                     else "test", crop_padding=4, flip=True, mixup_alpha=0.0)
  config.eval = dict(batch_size=128 if arg.runlocal else 500)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.sharding_rules = ((".*", "replicate"),)
  config.logical_axis_rules = ()
  # MobileNet / ShuffleNet students use lr 0.01 in RepDistiller.
  lr = 0.01 if student.startswith("mobilenet") else 0.05
  train = dict(batch_size=64 if not arg.runlocal else 32, learning_rate=lr, momentum=0.9, weight_decay=5e-4,
               warmup_steps=0, schedule="step", decay_at=(150 / 240, 180 / 240, 210 / 240), steps=steps,
               log_every=2 if arg.runlocal else 500, checkpoint_every=3 if arg.runlocal else 5 * STEPS_PER_EPOCH,
               keep_checkpoints=2, tensorboard=not arg.runlocal)
  config.teacher = dict(model=dict(name=teacher, overrides={}), seed=1234, ensemble=1, train=dict(train),
                        sharding_rules=(), logical_axis_rules=())
  config.student = dict(model=dict(name=student, overrides={}), train=train, sharding_rules=(), logical_axis_rules=())
  config.distill = vision_methods.distill_section(arg.method, steps=steps)
  config.data.update(vision_methods.DATA.get(arg.method, {}))
  config.teacher.update(vision_methods.TEACHERS.get(arg.method, {}))
  if arg.method in ("crd", "crd_kd"):
    # RepDistiller: 16384 negatives from the 50000 training images.
    config.distill.crd.num_negatives = 64 if arg.runlocal else 16384
  return config
