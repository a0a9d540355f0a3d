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
      # FitNet: the hint is the second stage (RepDistiller's hint_layer 2), through a learned 1×1
      # regressor with batch norm and ReLU (RepDistiller's ConvReg; a bare linear map diverged at weight 100).
      "fitnet": ce_plus(loss="fitnet", student="stage2", teacher="stage2", student_head="regressor"),
      "at": ce_plus(loss="at", student=STAGES, teacher=STAGES),
      "rkd": ce_plus(loss="rkd", student="pre_logits", teacher="pre_logits", weight=1.0),
      "pkt": ce_plus(loss="pkt", student="pre_logits", teacher="pre_logits"),
      "sp": ce_plus(loss="sp", student="stage3", teacher="stage3"),
      "cc": ce_plus(loss="cc", student="pre_logits", teacher="pre_logits", student_head="embed",
                    teacher_head="embed"),
      "nst": ce_plus(loss="nst", student=STAGES[1:], teacher=STAGES[1:]),
      "crd": dict(ce_weight=1.0, crd=dict(student="pre_logits", teacher="pre_logits")),
      "crd_kd": dict(kd, ce_weight=1.0, kd_weight=1.0, crd=dict(student="pre_logits", teacher="pre_logits")),
      # TRG (token relationship graph) on the last stage: contextual + kNN-graph terms, weight 1 each.
      "trg": ce_plus(loss="trg", student="stage3", teacher="stage3", weight=1.0),
      # Distiller's MI-α (α = 0.5) on the pooled feature, mapped to the teacher's width.
      "mi_alpha": ce_plus(loss="mi_alpha", student="pre_logits", teacher="pre_logits", student_head="linear",
                          weight=1.0),
      # DeiT (Touvron et al. 2021): a ViT student with a distillation token; CE on the class head at
      # 1 − λ, the distillation head against the teacher's argmax (hard, λ = 0.5) or soft targets
      # (T = 3, λ = 0.1), the paper's settings.
      "deit_hard": dict(ce_weight=0.5, logit_loss="deit_hard", kd_weight=0.5, temperature=1.0,
                        distill_head="distill_logits"),
      "deit_soft": dict(ce_weight=0.9, logit_loss="deit_soft", kd_weight=0.1, temperature=3.0,
                        distill_head="distill_logits"),
      # Function matching (Beyer et al. 2022, "a good teacher is patient and consistent") and MEAL V2 /
      # SSLD (label-free KD from a teacher ensemble): KL(p ‖ q) at T = 1 and no labels; function
      # matching also mixes each batch (the same view for both models: configs set data.mixup_alpha),
      # MEAL V2 averages several teachers' probabilities (configs set teacher.ensemble).
      "function_matching": dict(ce_weight=0.0, logit_loss="kd", kd_weight=1.0, temperature=1.0),
      "meal_v2": dict(ce_weight=0.0, logit_loss="kd", kd_weight=1.0, temperature=1.0),
      # KD++ (Wang et al. 2023): KD plus the ND term on the pooled feature, mapped to the teacher's width.
      "nd": dict(kd, ce_weight=1.0, kd_weight=1.0, features=(
          dict(loss="nd", student="pre_logits", teacher="pre_logits", student_head="linear"),)),
      # OFA-KD (Hao et al. 2023), Hao840/OFAKD's defaults: an exit on every stage, each and the final logits
      # distilled with the OFA loss (γ = 1.5, the reference's ImageNet command; T = 1), weights CE 1, final 1, exits 1.
      "ofa": dict(strategy="exits", target="teacher", exit_loss="ofa", gamma=1.5, temperature=1.0, ce_weight=1.0,
                  kd_weight=1.0, exit_weight=1.0),
      # Be Your Own Teacher (Zhang et al. 2019): exits on stages 1..N-1; each gets (1 - α)·CE + α·T²·KL(final ‖ exit)
      # with the reference code's α = 0.3, T = 3, plus λ·MSE to the deepest feature (λ = 1 is our choice: about 5%
      # of the loss at initialisation on digits); the final exit gets CE.
      "self_distill": dict(strategy="exits", target="final", exit_loss="kd", temperature=3.0, ce_weight=1.0,
                           exit_weight=0.3, exit_ce_weight=0.7, hint_weight=1.0),
      # The student's EMA as its teacher (m = 0.99: a ~100-step horizon for these short runs), CE + T²·KL at T = 4.
      "ema": dict(strategy="ema", momentum=0.99, ce_weight=1.0, kd_weight=1.0, temperature=4.0),
      # Quantisation-aware KD: the KD recipe for a low-bit student (its bits: QUANTIZE) taught by a float teacher.
      "qat_kd": kd,
  }
  if method not in methods:
    raise ValueError(f"unknown vision method {method!r}; known: {sorted(methods)}")
  return methods[method]


# What a method changes outside the loss: function matching mixes every batch (mixup α = 1, as
# big_vision's recipe); MEAL V2 distils from an ensemble of three teachers.
DATA = {"function_matching": dict(mixup_alpha=1.0)}
TEACHERS = {"meal_v2": dict(ensemble=3)}
# The student's `quantize` section (`kdjax.models.quantize.QuantSpec`; 0 bits = float): QAT-KD trains a W2A2
# student (LSQ steps, per-channel ternary weights), its first and last layers at 8 bits as LSQ keeps them.
QUANTIZE = {"qat_kd": dict(bits_weights=2, bits_activations=2, first_last_bits=8)}

# The methods of `RepresentationDistillation` that need only a teacher of the same data.
METHODS = ("kd", "dkd", "dist", "fitnet", "at", "rkd", "pkt", "sp", "cc", "nst", "crd", "crd_kd", "nd", "trg",
           "mi_alpha")
# The methods `kdjax.distill.exits` builds (sections with a `strategy` key).
EXIT_METHODS = ("ofa", "self_distill", "ema")
