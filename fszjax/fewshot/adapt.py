"""`fszjax adapt`: few-shot adaptation and domain generalisation, meta-training and evaluation.

Two backbones (``config.fewshot.backbone``):

- ``"towers"``: the image/text towers of a pretrained fszjax checkpoint
  (``config.init_from``: a pretraining workdir or a converted model). Image features of
  each evaluation split are computed once (the towers are frozen); episodes then run on
  features, so hundreds of episodes per setting take seconds. Methods:
    zeroshot          the text tower's classifier over the task's class names
    protonet          nearest class mean of tower features (ProtoNets without meta-training)
    linear_probe      logistic regression on frozen features, head from zeros
    zs_head_adapt     the zero-shot head (text embeddings x logit scale, + SigLIP bias)
                      adapted by SGD on the support set; 0 steps = zeroshot exactly
    wise_ft           WiSE-FT: 0.5 x zero-shot head + 0.5 x adapted head
    pixels_protonet   nearest class mean of raw pixels (how much any learning adds)
    anil              with ``fewshot.meta.enabled``: the image tower meta-trained by ANIL
                      (inner loop = zs_head_adapt, outer loop = the tower; checkpoints in
                      W/meta_checkpoints), then zs_head_adapt on its re-encoded features
    anil_zeroshot     the zero-shot classifier on the meta-trained tower
  plus domain generalisation on held-out fonts: a linear feature adaptor (identity at
  start, so step 0 is the pretrained model) is fine-tuned on the source fonts to classify
  the train characters through the frozen text classifier, either by plain fine-tuning
  (ERM) or by MLDG (meta-train / meta-test font split), and WiSE-FT interpolates the
  fine-tuned adaptor with the identity. Each variant is evaluated zero-shot and few-shot
  (ProtoNets, zs_head_adapt) on ``test_fonts`` and ``test_both``.

- ``"conv4"``: the MAML paper's Conv-4 trained from scratch by meta-learning
  (MAML/FOMAML/Reptile/ANIL/Meta-SGD/ProtoNets from `fszjax.fewshot.meta`) on the train
  split, with Orbax checkpoints and exact resume, then evaluated with the pixel baseline.

Modules: `episodes` (samplers, per-episode methods, tables), `eval_data` (towers and
evaluation data), `towers`, `dg_adaptor`, `meta_loop` (meta-training), `scratch` (Conv-4),
`results` (outputs).

Results: ``W/results.json`` ``{"methods": {M: {SPLIT: {"5way1shot": {"mean", "ci95",
"episodes"}}}}, "dg": {...}}``, ``W/results.md`` and ``W/accuracy_vs_shots.png``.
"""


from __future__ import annotations

import os
import time

import jax

from fszjax import config as config_lib
from fszjax.fewshot.episodes import AdaptError
from fszjax.fewshot.results import write_results
from fszjax.fewshot.scratch import run_conv4
from fszjax.fewshot.towers import run_towers


def run(config, workdir) -> dict:
  """Runs `fszjax adapt` (``config.fewshot.backbone``) and writes its results to `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  config_lib.save_config(config, os.path.join(workdir, "config.json"))
  t0 = time.perf_counter()
  backbone = config.fewshot.backbone
  if backbone == "towers":
    results = run_towers(config, workdir)
  elif backbone == "conv4":
    results = run_conv4(config, workdir)
  else:
    raise AdaptError(f"config.fewshot.backbone={backbone!r}: use 'towers' or 'conv4'")
  results["wall_time_s"] = time.perf_counter() - t0
  if jax.process_index() == 0:
    write_results(results, workdir)
  return results
