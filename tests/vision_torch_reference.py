"""PyTorch restatement of the RepDistiller / mdistiller CIFAR models and of timm's DeiT, for parity tests.

Each `*_forward(params, x, train)` runs one architecture with `torch.nn.functional` on the weights of a
`kdjax.models.vision` model (`nnx.to_pure_dict(nnx.state(model))`, converted to torch tensors by
`to_torch`), in NCHW as the reference code does, and returns `(logits, features)` with `features`
named like the kdjax capture names (NHWC / token-major, for direct comparison). The layout follows the
references, not kdjax:

  * convolutions `F.conv2d(..., padding=k // 2)` (kernels HWIO -> OIHW); BatchNorm `F.batch_norm` with
    momentum 0.1, eps 1e-5, updating the given running statistics in place when `train`;
  * CIFAR ResNet (`models/resnet.py`): relu(bn(conv)) stem, stages of basic blocks, the first block of
    stage 2 and 3 at stride 2, `F.avg_pool2d(x, 8)`;
  * WRN (`models/wrn.py`): the `equalInOut` branch logic of its BasicBlock, final relu(bn), avg_pool2d(8);
  * MobileNetV2 (`models/mobilenetv2.py`): the stride table 1, 1, 2, 2, 1, 2, 1 after a stride-2 stem,
    `F.avg_pool2d(x, 2, ceil_mode=True)`;
  * VGG-BN (`models/vgg.py`): max pooling after blocks 0, 1, 2, `F.adaptive_avg_pool2d(x, 1)`;
  * DeiT (timm `VisionTransformer` / `VisionTransformerDistilled`): qkv reshaped `(B, N, 3, H, d)` and
    permuted, `(q @ k^T) * d**-0.5` softmax, exact GELU, LayerNorm eps 1e-6, mean of the two heads.

Import it only after `pytest.importorskip("torch")`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_torch(tree):
  """Nested dict of arrays -> nested dict of float64 torch tensors (copies, so BN updates stay here)."""
  if isinstance(tree, dict):
    return {k: to_torch(v) for k, v in tree.items()}
  return torch.tensor(np.asarray(tree), dtype=torch.float64)


def nhwc(x):
  return x.permute(0, 2, 3, 1)


def _conv(x, p, stride=1, groups=1, padding=None):
  w = p["kernel"].permute(3, 2, 0, 1)
  k = w.shape[-1]
  return F.conv2d(x, w, p.get("bias"), stride=stride, padding=k // 2 if padding is None else padding, groups=groups)


def _bn(x, p, train):
  return F.batch_norm(x, p["mean"], p["var"], p["scale"], p["bias"], training=train, momentum=0.1, eps=1e-5)


def _linear(x, p):
  return x @ p["kernel"] + p["bias"]


def resnet_forward(params, x, train):
  feats = {}
  out = F.relu(_bn(_conv(x, params["stem"]), params["stem_norm"], train))
  feats["stem"] = out
  for s in sorted(params["stages"]):
    for b in sorted(params["stages"][s]):
      p = params["stages"][s][b]
      stride = 2 if s > 0 and b == 0 else 1
      h = F.relu(_bn(_conv(out, p["convs"][0], stride), p["norms"][0], train))
      h = _bn(_conv(h, p["convs"][1]), p["norms"][1], train)
      residual = _bn(_conv(out, p["shortcut"], stride), p["shortcut_norm"], train) if "shortcut" in p else out
      pre = h + residual
      out = F.relu(pre)
    feats[f"stage{s + 1}_preact"], feats[f"stage{s + 1}"] = pre, out
  pooled = F.avg_pool2d(out, 8).flatten(1)
  feats["pre_logits"] = pooled
  return _linear(pooled, params["fc"]), feats


def wrn_forward(params, x, train):
  feats = {}
  out = _conv(x, params["stem"])
  feats["stem"] = out
  for s in sorted(params["stages"]):
    for b in sorted(params["stages"][s]):
      p = params["stages"][s][b]
      stride = 2 if s > 0 and b == 0 else 1
      equal_in_out = "shortcut" not in p
      if equal_in_out:
        act = F.relu(_bn(out, p["norm1"], train))
        h = F.relu(_bn(_conv(act, p["conv1"], stride), p["norm2"], train))
        out = out + _conv(h, p["conv2"])
      else:
        out = F.relu(_bn(out, p["norm1"], train))
        h = F.relu(_bn(_conv(out, p["conv1"], stride), p["norm2"], train))
        out = _conv(out, p["shortcut"], stride, padding=0) + _conv(h, p["conv2"])
    feats[f"stage{s + 1}"] = out
  out = F.relu(_bn(out, params["final_norm"], train))
  pooled = F.avg_pool2d(out, 8).flatten(1)
  feats["pre_logits"] = pooled
  return _linear(pooled, params["fc"]), feats


_MOBILENET_STRIDES = (1, 1, 2, 2, 1, 2, 1)


def mobilenetv2_forward(params, x, train):
  feats = {}
  out = F.relu(_bn(_conv(x, params["stem"], 2), params["stem_norm"], train))
  feats["stem"] = out
  for g in sorted(params["groups"]):
    for b in sorted(params["groups"][g]):
      p = params["groups"][g][b]
      stride = _MOBILENET_STRIDES[g] if b == 0 else 1
      hidden = p["convs"][1]["kernel"].shape[-1]
      h = F.relu(_bn(_conv(out, p["convs"][0]), p["norms"][0], train))
      h = F.relu(_bn(_conv(h, p["convs"][1], stride, groups=hidden), p["norms"][1], train))
      h = _bn(_conv(h, p["convs"][2]), p["norms"][2], train)
      out = out + h if stride == 1 and out.shape == h.shape else h
    if g in (1, 2, 4, 6):
      feats[f"stage{(1, 2, 4, 6).index(g) + 1}"] = out
  out = F.relu(_bn(_conv(out, params["last_conv"]), params["last_norm"], train))
  pooled = F.avg_pool2d(out, 2, ceil_mode=True).flatten(1)
  feats["pre_logits"] = pooled
  return _linear(pooled, params["fc"]), feats


def vgg_forward(params, x, train):
  feats = {}
  blocks = params["blocks"]
  for i in sorted(blocks):
    if i in (1, 2, 3):
      x = F.max_pool2d(x, kernel_size=2, stride=2)
    convs, norms = blocks[i]["convs"], blocks[i]["norms"]
    for j in sorted(convs):
      x = _bn(_conv(x, convs[j]), norms[j], train)
      if j < len(convs) - 1:
        x = F.relu(x)
    if i:
      feats[f"stage{i}_preact"] = x
    x = F.relu(x)
    feats["stem" if i == 0 else f"stage{i}"] = x
  pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
  feats["pre_logits"] = pooled
  return _linear(pooled, params["fc"]), feats


def deit_forward(params, x, num_heads):
  feats = {}
  pe = params["patch_embed"]
  patches = _conv(x, pe, stride=pe["kernel"].shape[0], padding=0).flatten(2).transpose(1, 2)
  feats["patch_embed"] = patches
  b, n, d = patches.shape
  tokens = params["tokens"].expand(b, -1, -1)
  x = torch.cat([tokens, patches], dim=1) + params["pos_embed"]
  hd = d // num_heads

  def ln(x, p):
    return F.layer_norm(x, (d,), p["scale"], p["bias"], eps=1e-6)

  for i in sorted(params["blocks"]):
    p = params["blocks"][i]
    t = x.shape[1]
    qkv = _linear(ln(x, p["norm1"]), p["attn"]["qkv"]).reshape(b, t, 3, num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
    feats[f"block{i}/attention_probs"] = attn
    feats[f"block{i}/queries"] = q.transpose(1, 2)
    out = (attn @ v).transpose(1, 2).reshape(b, t, d)
    x = x + _linear(out, p["attn"]["proj"])
    x = x + _linear(F.gelu(_linear(ln(x, p["norm2"]), p["fc1"])), p["fc2"])
    feats[f"block{i}"] = x
  x = ln(x, params["norm"])
  feats["class_logits"] = _linear(x[:, 0], params["head"])
  if "head_dist" not in params:
    return feats["class_logits"], feats
  feats["distill_logits"] = _linear(x[:, 1], params["head_dist"])
  return (feats["class_logits"] + feats["distill_logits"]) / 2, feats
