"""Domain generalisation on held-out fonts with frozen towers: a linear feature adaptor
(identity at start, so step 0 is the pretrained model) fine-tuned on the source fonts to
classify the train characters through the frozen text classifier, by plain fine-tuning
(ERM) or MLDG (meta-train / meta-test font split); WiSE-FT interpolates the fine-tuned
adaptor with the identity. Each variant is evaluated zero-shot and few-shot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fszjax.fewshot import dg as dg_lib
from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot.episodes import SplitData, few_shot_table, replace_config, zeroshot_top1


def l2_normalize(x, axis=-1):
  """``x / max(|x|, 1e-12)`` (the adaptor's output normalisation)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _adaptor_apply(p, f):
  return l2_normalize(f @ p["A"] + p["b"])


def run_dg(config, train: SplitData, evals: dict[str, SplitData], scale, bias, fcfg) -> dict:
  """Fine-tune a feature adaptor on source fonts: ERM vs MLDG, and WiSE-FT of ERM."""
  dcfg = fcfg.dg
  e = train.feats.shape[1]
  init = {"A": jnp.eye(e, dtype=jnp.float32), "b": jnp.zeros((e,), jnp.float32)}
  text = jnp.asarray(train.text)

  def loss_fn(p, batch):
    f, y = batch["f"], batch["y"]
    logits = scale * _adaptor_apply(p, f) @ text.T + bias
    return inner_lib.cross_entropy(logits, y)

  rng = np.random.default_rng(config.seed)
  fonts = np.unique(train.domains)
  by_font = {int(f): np.nonzero(train.domains == f)[0] for f in fonts}
  bs = int(dcfg.batch_size)
  feats, labels = jnp.asarray(train.feats), jnp.asarray(train.labels)

  def batch_from(idx):
    return {"f": feats[idx], "y": labels[idx]}

  opt = optax.adam(float(dcfg.lr))
  # --- ERM (plain fine-tuning).
  erm_step = jax.jit(lambda p, s, b: _opt_step(loss_fn, opt, p, s, b))
  p, s = init, opt.init(init)
  for _ in range(int(dcfg.steps)):
    p, s, _ = erm_step(p, s, batch_from(rng.choice(len(train.labels), bs, replace=False)))
  erm = p
  # --- MLDG: meta-train fonts vs one meta-test font per step.
  mldg_step = dg_lib.make_mldg_step(loss_fn, opt, alpha=float(dcfg.mldg_alpha),
                                    beta=float(dcfg.mldg_beta),
                                    first_order=bool(dcfg.mldg_first_order), donate=False)
  p, s = init, opt.init(init)
  for _ in range(int(dcfg.steps)):
    test_font = int(rng.choice(fonts))
    tr_pool = np.concatenate([ix for f, ix in by_font.items() if f != test_font])
    te_pool = by_font[test_font]
    p, s, _ = mldg_step(p, s, batch_from(rng.choice(tr_pool, bs, replace=False)),
                        batch_from(rng.choice(te_pool, min(bs, len(te_pool)), replace=False)))
  mldg = p

  variants = {"pretrained": init, "finetune": erm, "mldg": mldg}
  for a in dcfg.wise_alphas:
    variants[f"wise_ft_{a:g}"] = dg_lib.wise_ft(init, erm, a)
  result: dict = {"zeroshot": {}, "fewshot": {}, "per_font": {}}
  samplers: dict = {}
  for name, params in variants.items():
    tf = (lambda x, params=params: np.asarray(_adaptor_apply(params, jnp.asarray(x))))
    result["zeroshot"][name] = {sp: zeroshot_top1(tf(d.feats), d) for sp, d in evals.items()}
    for sp, d in evals.items():
      if d.domain_names is None:
        continue
      hits = np.argmax(tf(d.feats) @ d.text.T, 1) == d.labels
      names = np.asarray(d.domain_names)
      result["per_font"].setdefault(sp, {})[name] = {
          str(f): float(hits[names == f].mean()) for f in sorted(set(d.domain_names))}
      result.setdefault("per_font_count", {})[sp] = {  # images per font (for intervals)
          str(f): int((names == f).sum()) for f in sorted(set(d.domain_names))}
    few = few_shot_table(evals, replace_config(fcfg, settings=list(dcfg.settings)), scale, bias,
                          config.seed + 1, transform=tf, methods=("protonet", "zs_head_adapt"),
                          samplers=samplers)
    result["fewshot"][name] = few
  return result


def _opt_step(loss_fn, opt, p, s, batch):
  loss, g = jax.value_and_grad(loss_fn)(p, batch)
  u, s = opt.update(g, s, p)
  return optax.apply_updates(p, u), s, loss
