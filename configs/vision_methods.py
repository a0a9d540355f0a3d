"""The classifier distillation methods of RepDistiller / mdistiller's tables as `distill` sections.

Shared by configs/vision_kd.py (digits, MNIST-5k) and configs/cifar100_kd.py (the published
CIFAR-100 pairs). Each entry is the reference recipe's loss for CIFAR-100: the student's CE at
weight 1 plus the method's term at RepDistiller's weight (`kdjax.losses.features.CIFAR100_WEIGHTS`),
except KD (0.1·CE + 0.9·KD at T = 4) and DKD / DIST (mdistiller's configs). Layer names are the
CIFAR ResNet / WRN activations (`kdjax.models.vision`): three stages, 'pre_logits' the pooled feature.
"""

from __future__ import annotations

STAGES = ("stage1", "stage2", "stage3")


def distill_section(method: str, *, steps: int) -> dict:
  """The `distill` section of `method` for a run of `steps` student steps.

  Methods: none (CE only: the distilled student equals the baseline, a control), kd, dkd, dist,
  fitnet, at, rkd, pkt, sp, cc, nst, crd, nd (KD++: KD + ND), and crd_kd (CRD + KD, the paper's best);
  and, built by `kdjax.distill.exits` (the section's `strategy` key), ofa (OFA-KD's exit branches),
  self_distill (Be Your Own Teacher: exits taught by the final exit, no teacher) and ema (KD from the
  student's own exponential moving average, no teacher).
  """
  kd = dict(ce_weight=0.1, logit_loss="kd", kd_weight=0.9, temperature=4.0)
  ce_plus = lambda **term: dict(ce_weight=1.0, features=(term,))  # noqa: E731
  methods = {
      "none": dict(ce_weight=1.0),
      "kd": kd,
      # mdistiller DKD: CE + DKD(α = 1, β = 8, T = 4), its weight ramped up over the first 20 of 240 epochs.
      "dkd": dict(ce_weight=1.0, logit_loss="dkd", temperature=4.0, logit_kwargs=dict(alpha=1.0, beta=8.0),
                  kd_weight=dict(kind="warmup_constant", value=1.0, warmup_steps=max(1, steps * 20 // 240))),
      # mdistiller DIST on CIFAR: CE + DIST(β = γ = 2, T = 4).
      "dist": dict(ce_weight=1.0, logit_loss="dist", temperature=4.0, logit_kwargs=dict(beta=2.0, gamma=2.0),
                   kd_weight=1.0),
      # FitNet: the hint is the second stage (RepDistiller's hint_layer 2), through a learned 1×1 regressor.
      "fitnet": ce_plus(loss="fitnet", student="stage2", teacher="stage2", student_head="linear"),
      "at": ce_plus(loss="at", student=STAGES, teacher=STAGES),
      "rkd": ce_plus(loss="rkd", student="pre_logits", teacher="pre_logits", weight=1.0),
      "pkt": ce_plus(loss="pkt", student="pre_logits", teacher="pre_logits"),
      "sp": ce_plus(loss="sp", student="stage3", teacher="stage3"),
      "cc": ce_plus(loss="cc", student="pre_logits", teacher="pre_logits", student_head="embed",
                    teacher_head="embed"),
      "nst": ce_plus(loss="nst", student=STAGES[1:], teacher=STAGES[1:]),
      "crd": dict(ce_weight=1.0, crd=dict(student="pre_logits", teacher="pre_logits")),
      "crd_kd": dict(kd, ce_weight=1.0, kd_weight=1.0, crd=dict(student="pre_logits", teacher="pre_logits")),
      # KD++ (Wang et al. 2023): KD plus the ND term on the pooled feature, mapped to the teacher's width.
      "nd": dict(kd, ce_weight=1.0, kd_weight=1.0, features=(
          dict(loss="nd", student="pre_logits", teacher="pre_logits", student_head="linear"),)),
      # OFA-KD (Hao et al. 2023), Hao840/OFAKD's defaults: an exit on every stage, each and the final logits
      # distilled with the OFA loss (γ = 1.5, the reference's ImageNet command; T = 1), weights CE 1, final 1, exits 1.
      "ofa": dict(strategy="exits", target="teacher", exit_loss="ofa", gamma=1.5, temperature=1.0, ce_weight=1.0,
                  kd_weight=1.0, exit_weight=1.0),
      # Be Your Own Teacher (Zhang et al. 2019): exits on stages 1..N-1; each gets (1 - α)·CE + α·T²·KL(final ‖ exit)
      # with the reference code's α = 0.3, T = 3, plus a hint to the deepest feature; the final exit gets CE.
      "self_distill": dict(strategy="exits", target="final", exit_loss="kd", temperature=3.0, ce_weight=1.0,
                           exit_weight=0.3, exit_ce_weight=0.7, hint_weight=0.1),
      # The student's EMA as its teacher (m = 0.99: a ~100-step horizon for these short runs), CE + T²·KL at T = 4.
      "ema": dict(strategy="ema", momentum=0.99, ce_weight=1.0, kd_weight=1.0, temperature=4.0),
  }
  if method not in methods:
    raise ValueError(f"unknown vision method {method!r}; known: {sorted(methods)}")
  return methods[method]


METHODS = ("kd", "dkd", "dist", "fitnet", "at", "rkd", "pkt", "sp", "cc", "nst", "crd", "crd_kd", "nd")
# The methods `kdjax.distill.exits` builds (sections with a `strategy` key).
EXIT_METHODS = ("ofa", "self_distill", "ema")
