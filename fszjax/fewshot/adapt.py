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

Results: ``W/results.json`` ``{"methods": {M: {SPLIT: {"5way1shot": {"mean", "ci95",
"episodes"}}}}, "dg": {...}}``, ``W/results.md`` and ``W/accuracy_vs_shots.png``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fszjax import interrupt
from fszjax import metrics as metrics_lib
from fszjax.errors import UserError
from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import meta as meta_lib

log = logging.getLogger("fszjax")


class AdaptError(UserError):
  """A few-shot config or input is wrong; the message names the fix."""


def parse_setting(s: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)way(\d+)shot", s)
  if not m:
    raise AdaptError(f"setting {s!r} must look like '5way1shot'")
  return int(m.group(1)), int(m.group(2))


def summarize(acc: np.ndarray) -> dict:
  """Mean and 95% confidence half-width of per-episode accuracies."""
  acc = np.asarray(acc, np.float64)
  n = len(acc)
  sd = float(acc.std(ddof=1)) if n > 1 else 0.0
  return {"mean": float(acc.mean()), "ci95": 1.96 * sd / math.sqrt(max(n, 1)), "episodes": n}


def _normalize(x, axis=-1):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


# ============================================================================ frozen towers


def _sampler(index, labels, n_way, k_shot, q_query, seed, what):
  """An `EpisodeSampler`, lowering the queries per class (down to 1) when the split has too
  few examples per class (held-out fonts cover few characters many times); None if even
  one query is impossible."""
  from fszjax.data.episodes import EpisodeError, EpisodeSampler

  for q in range(q_query, 0, -1):
    try:
      smp = EpisodeSampler(index, labels, n_way=n_way, k_shot=k_shot, q_query=q, seed=seed)
    except EpisodeError as e:
      err = e
      continue
    if q < q_query:
      log.info("%s: %d queries per class (the split has too few examples for %d)", what, q,
               q_query)
    return smp
  log.warning("%s skipped: %s", what, err)
  return None


def _proto_logits(fs, ys, fq, n_way):
  c = inner_lib.prototypes(fs, ys, n_way)
  return -(jnp.sum(fq * fq, -1, keepdims=True) - 2.0 * fq @ c.T + jnp.sum(c * c, -1))


def _acc(logits, y):
  return jnp.mean(jnp.argmax(logits, -1) == y)


def make_episode_eval(n_way: int, scale: float, bias: float, fcfg) -> Callable:
  """jitted ``f(fs, ys, fq, yq, text, ps, pq) -> {method: acc (T,)}`` over T tasks.

  fs/fq: (T, S|Q, E) normalised features; text: (T, N, E) normalised class text
  embeddings; ps/pq: (T, S|Q, P) pixel vectors. The same arguments give the same jitted
  function, so the many tables of a run (splits, meta-trained tower, DG variants) compile
  each task shape once.
  """
  return _episode_eval(int(n_way), float(scale), float(bias), int(fcfg.head_steps),
                       float(fcfg.head_lr), int(fcfg.probe_steps), float(fcfg.probe_lr))


@functools.lru_cache(maxsize=None)
def _episode_eval(n_way: int, scale: float, bias: float, steps: int, lr: float,
                  probe_steps: int, probe_lr: float) -> Callable:
  def one(fs, ys, fq, yq, text, ps, pq):
    head0 = inner_lib.zeroshot_head(text, scale, bias)
    out = {"zeroshot": _acc(inner_lib.linear_head(head0, fq), yq),
           "protonet": _acc(_proto_logits(fs, ys, fq, n_way), yq),
           "pixels_protonet": _acc(_proto_logits(ps, ys, pq, n_way), yq)}
    head, _ = inner_lib.inner_loop(
        lambda h: inner_lib.cross_entropy(inner_lib.linear_head(h, fs), ys), head0,
        steps=steps, lr=lr)
    out["zs_head_adapt"] = _acc(inner_lib.linear_head(head, fq), yq)
    wise = jax.tree.map(lambda a, b: 0.5 * (a + b), head0, head)
    out["wise_ft"] = _acc(inner_lib.linear_head(wise, fq), yq)
    zero = inner_lib.zeros_head(fs.shape[-1], n_way, fs.dtype)
    probe, _ = inner_lib.inner_loop(
        lambda h: inner_lib.cross_entropy(inner_lib.linear_head(h, fs * scale), ys), zero,
        steps=probe_steps, lr=probe_lr)
    out["linear_probe"] = _acc(inner_lib.linear_head(probe, fq * scale), yq)
    return out

  return jax.jit(jax.vmap(one))


def _episodes_on_features(sampler, n_episodes, batch, fn, feats, text, pix):
  """Runs `fn` over `n_episodes` episodes drawn by `sampler` (indices into feats)."""
  accs: dict[str, list] = {}
  done, index = 0, 0
  while done < n_episodes:
    t = min(batch, n_episodes - done)
    ep = sampler.sample(index, t)
    index += 1
    si, qi = ep["support_x"], ep["query_x"]  # indices (T, S), (T, Q)
    cls = ep["classes"]
    out = fn(feats[si], ep["support_y"], feats[qi], ep["query_y"], text[cls], pix[si], pix[qi])
    for k, v in out.items():
      accs.setdefault(k, []).append(np.asarray(v))
    done += t
  return {k: np.concatenate(v) for k, v in accs.items()}


@dataclasses.dataclass
class SplitData:
  feats: np.ndarray  # (N, E) normalised image embeddings
  labels: np.ndarray
  domains: np.ndarray
  text: np.ndarray  # (C, E) zero-shot classifier rows of the split's classes
  pix: np.ndarray  # (N, P) normalised pixels
  class_names: list
  domain_names: list | None = None
  images: np.ndarray | None = None  # kept when the towers are meta-trained (re-encoded after)


def _load_towers(config):
  """(model config, base dir, module, params) of ``config.init_from``: a pretraining
  workdir, a checkpoints directory, one checkpoint step directory, or a directory written
  by `fszjax convert` (open_clip / big_vision)."""
  from fszjax import checkpoint, inference
  from fszjax.models.two_tower import build_model

  src = config.init_from
  if not src:
    raise AdaptError("config.init_from is empty; pass --config.init_from=<pretraining workdir, "
                     "checkpoint or converted model>")
  src = os.path.abspath(os.path.expanduser(src))
  if not os.path.exists(src):
    raise AdaptError(f"config.init_from={src} does not exist; run `fszjax pretrain` first or "
                     "pass a checkpoint or converted model directory")
  try:
    pre, base_dir = inference.load_config(src)
  except inference.LoadError as e:
    raise AdaptError(f"config.init_from: {e}") from None
  if "model" not in pre or "data" not in pre:
    raise AdaptError(f"{base_dir} holds no model config (config.json with model and data "
                     "sections); pass a fszjax workdir, checkpoint or converted directory")
  params = checkpoint.load_params_numpy(src)
  return pre, base_dir, build_model(pre.model), jax.tree.map(jnp.asarray, params)


# Keys of ``config.data`` in an adapt config: the evaluation dataset. None = the model's
# own (its pretraining dataset); a new ``name`` starts from that kind of dataset's defaults
# (`fszjax.data.defaults`). The model's preprocessing (image size, channels, mean / std,
# text length) and tokenizer always come from the model.
DATASET_KEYS = ("name", "data_dir", "train_split", "eval_splits", "image_key", "label_key",
                "text_key", "domain_key", "class_names_file", "image_decoder",
                "prompt_templates", "num_threads")
GLYPH_KEYS = ("image_size", "font_dirs", "max_chars")
GLYPH_TEST_SPLITS = ("test_classes", "test_scripts", "test_fonts", "test_both")


def data_overrides():
  """The ``data`` section of an adapt config: every dataset key unset (None)."""
  import ml_collections

  d = ml_collections.ConfigDict({k: None for k in DATASET_KEYS})
  d.glyphs = ml_collections.ConfigDict({k: None for k in GLYPH_KEYS})
  return d


def _is_glyphs(name: str) -> bool:
  base = str(name).split(":")[0]
  return base == "glyphs" or base.startswith("glyphs/")


def eval_data_config(model_data, overrides):
  """The data config `fszjax adapt` evaluates on: the model's data section (preprocessing,
  tokenizer, and by default its dataset) with the adapt config's dataset keys applied."""
  from fszjax.data import defaults, glyphs as glyphs_lib

  d = model_data.copy_and_resolve_references()
  over = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides or {})
  name = over.get("name")
  with d.ignore_type():
    if name and name != d.get("name"):
      fresh = (defaults.glyphs_data_config() if _is_glyphs(name)
               else defaults.tfds_data_config(str(name)))
      for k in DATASET_KEYS + ("glyphs",):
        d[k] = fresh[k]
      if _is_glyphs(name):
        d.glyphs.image_size = glyphs_lib.DEFAULT_IMAGE_SIZE  # resized to the model's size
      d.mixture = ()
    for k in DATASET_KEYS:
      if over.get(k) is not None:
        d[k] = over[k]
    for k, v in (over.get("glyphs") or {}).items():
      if v is not None:
        if "glyphs" not in d:
          d.glyphs = data_overrides().glyphs
        d.glyphs[k] = v
  return d


def eval_splits(fcfg, data_cfg) -> list:
  """``fewshot.splits``, or when empty the dataset's test splits: Glyphs' four test splits,
  else ``data.eval_splits``."""
  splits = list(fcfg.get("splits", None) or ())
  if splits:
    return splits
  if _is_glyphs(data_cfg.name) and not data_cfg.get("mixture", ()):
    return list(GLYPH_TEST_SPLITS)
  return list(data_cfg.eval_splits)


def _image_feats(encoder, images) -> np.ndarray:
  from fszjax import evaluate

  return evaluate._normalize(encoder.images(images)).astype(np.float32)  # pylint: disable=protected-access


def _split_data(encoder, data_cfg, split, templates, max_examples, keep_images=False) -> SplitData:
  from fszjax import evaluate
  from fszjax.data import arrays as arrays_lib

  arrays = arrays_lib.load_split_arrays(data_cfg, split, max_examples)
  arrays = evaluate._remap_to_present(arrays)  # pylint: disable=protected-access
  feats = _image_feats(encoder, arrays["image"])
  text = evaluate.zero_shot_classifier(encoder.texts, arrays["class_names"], templates)
  pix = arrays["image"].reshape(len(feats), -1)
  pix = pix / np.maximum(np.linalg.norm(pix, axis=1, keepdims=True), 1e-6)
  return SplitData(feats, np.asarray(arrays["label"]),
                   np.asarray(arrays.get("domain", np.zeros(len(feats), np.int64))),
                   text.astype(np.float32), pix.astype(np.float32), list(arrays["class_names"]),
                   arrays.get("domain_name"), arrays["image"] if keep_images else None)


def _few_shot_table(data: dict[str, SplitData], fcfg, scale, bias, seed, transform=None,
                    methods=None, samplers: dict | None = None) -> dict:
  """{method: {split: {setting: summary}}} on (optionally transformed) features.

  `samplers`: a dict shared by calls on the same splits (labels) and seed, so each split's
  episode samplers are built once (the episodes depend only on labels and seed)."""
  out: dict = {}
  samplers = {} if samplers is None else samplers
  for split, d in data.items():
    feats = d.feats if transform is None else transform(d.feats)
    for setting in fcfg.settings:
      n_way, k_shot = parse_setting(setting)
      key = (split, setting, seed)
      if key not in samplers:
        samplers[key] = _sampler(np.arange(len(feats)), d.labels, n_way, k_shot,
                                 int(fcfg.q_query), seed, f"{split} {setting}")
      sampler = samplers[key]
      if sampler is None:
        continue
      fn = make_episode_eval(n_way, scale, bias, fcfg)
      with metrics_lib.timed(f"few-shot {split} {setting}: {int(fcfg.episodes)} episodes", log):
        accs = _episodes_on_features(sampler, int(fcfg.episodes), int(fcfg.episode_batch), fn,
                                     feats, d.text, d.pix)
      for m, a in accs.items():
        if methods is not None and m not in methods:
          continue
        out.setdefault(m, {}).setdefault(split, {})[setting] = summarize(a)
  return out


def _zeroshot_top1(feats, d: SplitData, scale) -> dict:
  logits = feats @ d.text.T
  acc = (np.argmax(logits, 1) == d.labels).astype(np.float64)
  s = summarize(acc)
  return {"top1": s["mean"], "ci95": s["ci95"], "num_examples": len(acc),
          "num_classes": len(d.class_names), "chance": 1.0 / len(d.class_names)}


def _adaptor_apply(p, f):
  return _normalize(f @ p["A"] + p["b"])


def _dg(config, train: SplitData, evals: dict[str, SplitData], scale, bias, fcfg) -> dict:
  """Fine-tune a feature adaptor on source fonts: ERM vs MLDG, and WiSE-FT of ERM."""
  from fszjax.fewshot import dg as dg_lib

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
    variants[f"wise_ft_{a:g}"] = jax.tree.map(lambda z, f, a=a: (1 - a) * z + a * f, init, erm)
  result: dict = {"zeroshot": {}, "fewshot": {}, "per_font": {}}
  samplers: dict = {}
  for name, params in variants.items():
    tf = (lambda x, params=params: np.asarray(_adaptor_apply(params, jnp.asarray(x))))
    result["zeroshot"][name] = {sp: _zeroshot_top1(tf(d.feats), d, scale) for sp, d in evals.items()}
    for sp, d in evals.items():
      if d.domain_names is None:
        continue
      hits = np.argmax(tf(d.feats) @ d.text.T, 1) == d.labels
      names = np.asarray(d.domain_names)
      result["per_font"].setdefault(sp, {})[name] = {
          str(f): float(hits[names == f].mean()) for f in sorted(set(d.domain_names))}
      result.setdefault("per_font_count", {})[sp] = {  # images per font (for intervals)
          str(f): int((names == f).sum()) for f in sorted(set(d.domain_names))}
    few = _few_shot_table(evals, _replace(fcfg, settings=list(dcfg.settings)), scale, bias,
                          config.seed + 1, transform=tf, methods=("protonet", "zs_head_adapt"),
                          samplers=samplers)
    result["fewshot"][name] = few
  return result


def _replace(cfg, **kw):
  c = cfg.copy_and_resolve_references()
  for k, v in kw.items():
    with c.ignore_type():
      c[k] = v
  return c


def _opt_step(loss_fn, opt, p, s, batch):
  loss, g = jax.value_and_grad(loss_fn)(p, batch)
  u, s = opt.update(g, s, p)
  return optax.apply_updates(p, u), s, loss


def run_towers(config, workdir) -> dict:
  from fszjax import evaluate
  from fszjax.data import errors as data_errors, sources
  from fszjax.models.two_tower import TwoTower

  from fszjax import inference

  fcfg = config.fewshot
  pre, base_dir, model, params = _load_towers(config)
  data_cfg = eval_data_config(pre.data, config.get("data", None) or {})
  tokenizer = inference.model_tokenizer(pre, base_dir)  # the model's own, never the data's
  encoder = evaluate.Encoder(model, params, tokenizer, max_len=pre.model.text.max_len)
  splits = eval_splits(fcfg, data_cfg)
  log.info("evaluating %s (%s) on %s splits %s", base_dir, type(tokenizer).__name__,
           data_cfg.name, ", ".join(splits))
  t, b = model.apply({"params": params}, method=TwoTower.scale_and_bias)
  scale = float(jnp.exp(t))
  bias = float(b) if b is not None else 0.0
  templates = list(sources.prompt_templates(data_cfg))
  meta_on = bool(fcfg.get("meta", {}) and fcfg.meta.get("enabled", False))
  data = {}
  for split in splits:
    try:
      data[split] = _split_data(encoder, data_cfg, split, templates,
                                fcfg.get("max_examples", 0) or None, keep_images=meta_on)
    except data_errors.DataError as e:
      raise AdaptError(f"{e} (evaluation data of `fszjax adapt`: choose it with "
                       "--config.data.name=..., --config.data.data_dir=... and "
                       "--config.fewshot.splits=[...])") from None
    log.info("features of %s: %d images, %d classes", split, len(data[split].labels),
             len(data[split].class_names))
  samplers: dict = {}
  results = {"methods": _few_shot_table(data, fcfg, scale, bias, config.seed, samplers=samplers),
             "zeroshot_top1": {sp: _zeroshot_top1(d.feats, d, scale) for sp, d in data.items()}}
  train = None
  dg_on = bool(fcfg.dg.enabled) and any(sp in data for sp in fcfg.dg.splits)
  if fcfg.dg.enabled and not dg_on:
    log.info("domain generalisation skipped: none of config.fewshot.dg.splits=%s is evaluated",
             list(fcfg.dg.splits))
  transfer_on = bool(fcfg.get("transfer", {}) and fcfg.transfer.get("enabled", False))
  if dg_on or meta_on or transfer_on:  # loaded once for all
    train = _split_data(encoder, data_cfg, data_cfg.train_split, templates,
                        fcfg.get("max_train_examples", 0) or None, keep_images=meta_on)
  if transfer_on:
    tr = _transfer_towers(config, encoder, data_cfg, templates, train, data, scale, bias,
                          samplers)
    results["methods"].update(tr.pop("methods"))
    results.update(tr)
  if meta_on:
    with metrics_lib.timed(f"meta-training ({fcfg.meta.algorithm}) of the image tower and its "
                           "evaluation", log):
      meta = _meta_towers(config, workdir, pre.model, model, params, encoder, train, data,
                          scale, bias, samplers)
    results["methods"].update(meta.pop("methods"))
    results.update(meta)
  if dg_on:
    evals = {sp: data[sp] for sp in fcfg.dg.splits if sp in data}
    with metrics_lib.timed(f"domain generalisation (ERM, MLDG, WiSE-FT) on {list(evals)}", log):
      results["dg"] = _dg(config, train, evals, scale, bias, fcfg)
  return results


def _domain_keys(d: SplitData) -> np.ndarray:
  return np.asarray(d.domain_names) if d.domain_names is not None else np.asarray(d.domains)


def _transfer_towers(config, encoder, data_cfg, templates, train: SplitData,
                     data: dict[str, SplitData], scale: float, bias: float,
                     samplers: dict) -> dict:
  """`fszjax.fewshot.transfer`'s methods on the frozen features: hyper-parameters chosen per
  setting on ``val`` (queries: val's held-out examples; supports: train examples of the
  same characters in other fonts), then evaluated on the same episodes as the other
  methods. Returns ``{"methods": ..., "transfer_selection": {setting: chosen}}``."""
  from fszjax.fewshot import transfer

  fcfg, tcfg = config.fewshot, config.fewshot.transfer
  val = _split_data(encoder, data_cfg, tcfg.val_split, templates, None)
  name_to_train = {n: i for i, n in enumerate(train.class_names)}
  vy = np.asarray([name_to_train.get(val.class_names[int(l)], -1) for l in val.labels])
  keep = np.nonzero(vy >= 0)[0]
  tdom, vdom = _domain_keys(train), _domain_keys(val)[keep]
  vfeats, tfeats, ttext = val.feats[keep], train.feats, train.text
  proto_grid = transfer.grid({"proto_weight": list(tcfg.proto_weights), "steps": list(tcfg.steps),
                              "lr": list(tcfg.lrs)})
  proto_grid = [c for c in proto_grid if c["steps"] > 0 or c["lr"] == tcfg.lrs[0]]
  tip_grid = transfer.grid({"alpha": list(tcfg.alphas), "beta": list(tcfg.betas)})
  chosen, methods = {}, {}
  gate = bool(tcfg.get("gate", True))
  for setting in fcfg.settings:
    n_way, k_shot = parse_setting(setting)
    eps = transfer.cross_font_episodes(train.labels, tdom, vy[keep], vdom, n_way=n_way,
                                       k_shot=k_shot, episodes=int(tcfg.val_episodes),
                                       seed=config.seed + 101)
    if eps is None:
      log.warning("transfer: val has too few classes for %s; skipped", setting)
      continue
    args = (tfeats[eps["support"]], eps["support_y"], vfeats[eps["query"]], eps["query_y"],
            ttext[eps["classes"]], np.zeros((1,)), np.zeros((1,)))
    args = args[:5] + (np.zeros((len(eps["query"]), 1, 1), np.float32),) * 2

    def score(c, m, base):
      fn = transfer.make_feature_eval(n_way, scale, bias, **{**base, **c}, gate=gate)
      return float(np.mean(np.asarray(fn(*args)[m])))

    tip0 = {"alpha": float(tcfg.alphas[0]), "beta": float(tcfg.betas[0])}
    pz = transfer.select_on_val(lambda c: score(c, "proto_zs_adapt", tip0), proto_grid,
                                f"proto_zs_adapt {setting}")
    tip = transfer.select_on_val(
        lambda c: score(c, "tip_adapter", {"proto_weight": 1.0, "steps": 0, "lr": 0.0}),
        tip_grid, f"tip_adapter {setting}")
    chosen[setting] = {"proto_zs_adapt": pz, "tip_adapter": tip}
    fn = transfer.make_feature_eval(
        n_way, scale, bias, float(pz["proto_weight"]), int(pz["steps"]), float(pz["lr"]),
        float(tip["alpha"]), float(tip["beta"]), gate)
    for split, d in data.items():
      sampler = samplers.get((split, setting, config.seed))
      if sampler is None:
        continue
      accs = _episodes_on_features(sampler, int(fcfg.episodes), int(fcfg.episode_batch), fn,
                                   d.feats, d.text, d.pix)
      for m, a in accs.items():
        methods.setdefault(m, {}).setdefault(split, {})[setting] = summarize(a)
  return {"methods": methods, "transfer_selection": chosen}


def towers_meta_cfg(fcfg, scale: float, bias: float) -> meta_lib.MetaConfig:
  """Meta-learning of the image tower from the zero-shot head: the inner loop is the one
  `zs_head_adapt` evaluates (``head_steps`` SGD steps of ``head_lr`` from the text
  tower's classifier), so at evaluation the meta-trained tower runs that same method."""
  m = fcfg.meta
  if m.algorithm not in ("anil", "fomaml", "maml"):
    raise AdaptError(f"config.fewshot.meta.algorithm={m.algorithm!r} for the towers: use "
                     "'anil' (head adapts) or 'maml' / 'fomaml' with adapt='head'")
  adapt = m.get("adapt", "head")
  if adapt != "head":
    raise AdaptError(f"config.fewshot.meta.adapt={adapt!r}: for the towers the inner loop adapts "
                     "the zero-shot head ('head'); evaluation re-encodes each split once with "
                     "the meta-trained tower")
  n_way, _ = parse_setting(m.train_setting)
  return meta_lib.MetaConfig(
      algorithm=m.algorithm, n_way=n_way, inner_steps=int(fcfg.head_steps),
      inner_lr=float(fcfg.head_lr), adapt="head", first_order=bool(m.first_order),
      remat=bool(m.get("remat", False)), head_init="zeroshot", logit_scale=scale,
      logit_bias=bias, task_chunk=int(m.get("task_chunk", 0)))


def _meta_towers(config, workdir, model_cfg, model, params, encoder, train: SplitData,
                 data: dict[str, SplitData], scale: float, bias: float, samplers: dict) -> dict:
  """Meta-trains the image tower (ANIL: the zero-shot head adapts in the inner loop, the
  tower learns in the outer loop) on train-split tasks, then re-encodes every evaluation
  split and reports ``{alg}`` (zero-shot head adapted on the meta-trained tower) and
  ``{alg}_zeroshot``."""
  from fszjax import evaluate
  from fszjax.data.episodes import EpisodeSampler
  from fszjax.fewshot import inner
  from fszjax.models.two_tower import build_image_tower

  fcfg, m = config.fewshot, config.fewshot.meta
  mcfg = towers_meta_cfg(fcfg, scale, bias)
  tower = build_image_tower(model_cfg)

  def features_fn(backbone, x):
    z, _ = tower.apply({"params": backbone}, x)
    return inner.l2_normalize(z)

  n_way, k_shot = parse_setting(m.train_setting)
  sampler = EpisodeSampler(train.images, train.labels, n_way=n_way, k_shot=k_shot,
                           q_query=int(m.q_query), seed=config.seed)
  t0 = time.perf_counter()
  meta_params = meta_train(config, os.path.join(workdir, "meta_checkpoints"), features_fn, mcfg,
                           {"backbone": params["img"]},
                           lambda step: _tasks(sampler.sample(step, int(m.meta_batch)), train.text))
  train_s = time.perf_counter() - t0
  enc = evaluate.Encoder(model, {**params, "img": meta_params["backbone"]}, encoder.tokenizer,
                         max_len=encoder.max_len)
  meta_data = {sp: dataclasses.replace(d, feats=_image_feats(enc, d.images))
               for sp, d in data.items()}
  table = _few_shot_table(meta_data, fcfg, scale, bias, config.seed,
                          methods=("zs_head_adapt", "zeroshot"), samplers=samplers)
  names = {"zs_head_adapt": m.algorithm, "zeroshot": f"{m.algorithm}_zeroshot"}
  return {"methods": {names[k]: v for k, v in table.items()},
          "meta_training": {"steps": int(m.steps), "algorithm": m.algorithm,
                            "train_setting": m.train_setting, "meta_batch": int(m.meta_batch),
                            "wall_time_s": train_s},
          "zeroshot_top1_meta": {sp: _zeroshot_top1(d.feats, d, scale)
                                 for sp, d in meta_data.items()}}


# ============================================================================ Conv-4 meta-learning


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1] == size:
    return images
  out = jax.image.resize(jnp.asarray(images), (images.shape[0], size, size, images.shape[3]),
                         "linear", antialias=True)
  return np.asarray(out)


def _meta_cfg(fcfg, n_way: int) -> meta_lib.MetaConfig:
  m = fcfg.meta
  return meta_lib.MetaConfig(
      algorithm=m.algorithm, n_way=n_way, inner_steps=int(m.inner_steps),
      inner_lr=float(m.inner_lr), adapt=m.get("adapt", "all"), first_order=bool(m.first_order),
      remat=bool(m.get("remat", False)), head_init=m.head_init,
      eval_inner_steps=int(m.eval_inner_steps) or None,
      eval_inner_lr=float(m.get("eval_inner_lr", 0.0)) or None, task_chunk=int(m.task_chunk))


def _tasks(ep: dict, text: np.ndarray | None = None) -> dict:
  """The arrays of a sampled meta-batch that the meta-step takes (+ class text embeddings)."""
  tasks = {k: ep[k] for k in ("support_x", "support_y", "query_x", "query_y")}
  if text is not None:
    tasks["text_emb"] = text[ep["classes"]]
  return tasks


def outer_optimizer(m) -> optax.GradientTransformation:
  """The meta-optimizer of ``config.fewshot.meta``: Adam (SGD for Reptile, whose "gradient"
  is the step towards the adapted weights) at ``outer_lr``, constant or, with
  ``outer_schedule='cosine'``, linear warmup over ``warmup_steps`` then cosine decay to 0
  at ``steps``."""
  lr = float(m.outer_lr)
  schedule = m.get("outer_schedule", "constant")
  if schedule == "cosine":
    total = max(int(m.steps), 1)
    warmup = min(int(m.get("warmup_steps", 0)), total - 1)
    lr = optax.warmup_cosine_decay_schedule(0.0 if warmup else lr, lr, warmup, total, 0.0)
  elif schedule != "constant":
    raise AdaptError(f"config.fewshot.meta.outer_schedule={schedule!r}: use 'constant' or 'cosine'")
  return optax.sgd(lr) if m.algorithm == "reptile" else optax.adam(lr)


def _local_devices(m) -> int:
  """Devices that share the meta-batch and the evaluation episodes: this process's devices
  (``fewshot.meta.devices``: 0 = all, else at most that many). With several processes each
  runs the whole (identical) work on one device."""
  n = jax.local_device_count() if jax.process_count() == 1 else 1
  want = int(m.get("devices", 0) or 0)
  return min(n, want) if want else n


def meta_train(config, ckpt_dir: str, features_fn, mcfg: meta_lib.MetaConfig, meta_params,
               sample: Callable[[int], dict]):
  """Meta-trains ``config.fewshot.meta.steps`` steps on ``sample(step)`` meta-batches, with
  Orbax checkpoints in `ckpt_dir` and exact resume (batches are drawn by step index);
  on preemption (SIGTERM) it saves and exits 0, on Ctrl-C it saves and raises
  `KeyboardInterrupt`, on a non-finite loss it stops with the last good checkpoint kept.
  Returns the meta-params."""
  from fszjax import checkpoint

  m = config.fewshot.meta
  opt = outer_optimizer(m)
  opt_state = opt.init(meta_params)
  mesh = None
  ndev = _local_devices(m)
  if ndev > 1 and int(m.meta_batch) % ndev == 0:
    from fszjax import sharding

    mesh = sharding.make_mesh(ndev, 1, 1, devices=jax.local_devices()[:ndev])
    log.info("meta-batch of %d tasks sharded over %d devices", int(m.meta_batch), ndev)
  elif ndev > 1:
    log.warning("meta_batch=%d is not a multiple of the %d devices: meta-training on one",
                int(m.meta_batch), ndev)
  step_fn = meta_lib.make_meta_step(features_fn, mcfg, opt, mesh=mesh, donate=False)
  ckpt = checkpoint.Checkpointer(ckpt_dir, save_every=int(config.checkpoint.save_every),
                                 keep=int(config.checkpoint.keep), async_save=False,
                                 on_save_error=config.checkpoint.get("on_save_error", "stop"))
  state = {"step": jnp.zeros((), jnp.int32), "params": meta_params, "opt_state": opt_state}
  start = 0
  if ckpt.all_steps():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    start, state = ckpt.restore(abstract)
    log.info("resumed meta-training at step %d", start)
  meta_params, opt_state = state["params"], state["opt_state"]
  ckpt.reached_preemption(start)  # JAX's sync point counts from the last reported step
  total = int(m.steps)
  t0 = time.perf_counter()
  log_every = int(config.log_every)
  # Meta-training curves: WORKDIR/metrics.jsonl and WORKDIR/tensorboard (process 0).
  writer = metrics_lib.MetricWriter(os.path.dirname(os.path.abspath(ckpt_dir)),
                                    enabled=jax.process_index() == 0)
  writer.truncate_after(start)
  with interrupt.StopRequest("meta-training") as stop:
    for step in range(start + 1, total + 1):
      meta_params, opt_state, metrics = step_fn(meta_params, opt_state, sample(step))
      if step % log_every == 0 or step == total:  # the only host sync of a step
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(host["loss"]):
          raise AdaptError(f"meta-training loss is {host['loss']} at step {step}; lower "
                           "config.fewshot.meta.outer_lr (the last good checkpoint is kept)")
        elapsed = time.perf_counter() - t0
        rate = (step - start) * int(m.meta_batch) / elapsed
        log.info("meta step %d/%d loss %.4f query acc %.3f %.1f tasks/s, ETA %s", step, total,
                 host["loss"], host["acc"], rate,
                 metrics_lib.eta(step - start, total - start, elapsed))
        writer.write(step, {**host, "tasks_per_sec": rate})
      preempted, interrupted = ckpt.reached_preemption(step), stop.requested
      if ckpt.should_save(step) or step == total or preempted or interrupted:
        ckpt.save(step, {"step": jnp.asarray(step, jnp.int32), "params": meta_params,
                         "opt_state": opt_state}, force=True)
      if preempted or interrupted:
        ckpt.close()
        writer.close()
        log.warning("stopped at meta step %d (%s); rerun the same command to resume", step,
                    "preemption" if preempted else "Ctrl-C")
        if interrupted:
          raise KeyboardInterrupt
        raise SystemExit(0)
  ckpt.close()
  writer.close()
  return meta_params


def rotation_classes(images: np.ndarray, labels: np.ndarray,
                     rotations: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """Class augmentation by rotation (the Omniglot convention): every rotation in degrees
  (multiples of 90, 0 = the originals) turns each class into a new class.

  Returns ``(images, labels)`` with ``len(rotations)`` times as many of each; rotation i
  of class c gets label ``c + i * num_classes``.
  """
  rotations = [int(r) for r in rotations]
  if not rotations or any(r % 90 for r in rotations) or len(set(r % 360 for r in rotations)) < len(rotations):
    raise AdaptError(f"config.fewshot.meta.rotations={rotations} must be distinct multiples of "
                     "90 degrees, e.g. [0] (none) or [0, 90, 180, 270]")
  if rotations == [0]:
    return images, labels
  labels = np.asarray(labels)
  n_cls = int(labels.max()) + 1
  xs = [np.rot90(images, (r // 90) % 4, axes=(1, 2)) for r in rotations]
  ys = [labels + i * n_cls for i in range(len(rotations))]
  return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)


def _chunked(fn: Callable, chunk: int, devices: int = 1) -> Callable:
  """``fn`` over a leading task axis, jitted: one vmap (chunk 0), or a `lax.map` over groups
  of `chunk` vmapped tasks (faster on CPU: a group's activations stay in cache). With
  ``devices > 1`` the task axis is split over that many local devices (`jax.shard_map`),
  each running its share the same way. Pads the task axis as needed and drops the padding
  from the result. `fn` may close over arrays (replicated)."""

  def local(tasks):
    if chunk <= 0:
      return jax.vmap(fn)(tasks)
    t = jax.tree.leaves(tasks)[0].shape[0]
    pad = -t % chunk
    padded = jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]), tasks)
    grouped = jax.tree.map(lambda a: a.reshape((-1, chunk) + a.shape[1:]), padded)
    out = jax.lax.map(jax.vmap(fn), grouped)
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:t], out)

  if devices <= 1:
    return jax.jit(local)
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((devices,), ("tasks",), devices=jax.local_devices()[:devices],
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P("tasks"), out_specs=P("tasks"),
                                  check_vma=False))

  def run(tasks):
    t = jax.tree.leaves(tasks)[0].shape[0]
    pad = -t % devices
    if pad:
      tasks = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]), tasks)
    out = sharded(tasks)
    return jax.tree.map(lambda a: a[:t], out)

  return run


def run_conv4(config, workdir) -> dict:
  from fszjax.data import arrays as arrays_lib
  from fszjax.data.episodes import EpisodeSampler
  from fszjax.fewshot import conv4

  fcfg, m = config.fewshot, config.fewshot.meta
  size = int(fcfg.image_size)
  train = arrays_lib.load_split_arrays(config.data, config.data.train_split,
                                     fcfg.get("max_train_examples", 0) or None)
  train_x, train_y = rotation_classes(_resize(train["image"], size), train["label"],
                                      list(m.get("rotations", [0])))
  n_way_train, k_train = parse_setting(m.train_setting)
  sampler = EpisodeSampler(train_x, train_y, n_way=n_way_train, k_shot=k_train,
                           q_query=int(m.q_query), seed=config.seed)
  pool = m.get("pool", "mean")
  features_fn = conv4.make_conv4_features_fn(m.get("formulation", conv4.DEFAULT_FORMULATION),
                                             pool=pool)
  mcfg = _meta_cfg(fcfg, n_way_train)
  params = conv4.init_conv4(jax.random.key(config.seed), n_way_train, hidden=int(m.hidden),
                            image_size=size, pool=pool)
  meta_params = meta_lib.init_meta_params(mcfg, params)
  meta_params = meta_train(config, os.path.join(workdir, "checkpoints"), features_fn, mcfg,
                           meta_params, lambda step: _tasks(sampler.sample(step, int(m.meta_batch))))
  # ---- evaluation: one jitted evaluator per N (reused across splits: same program).
  evaluators: dict[int, tuple[Callable, Callable]] = {}

  def evaluator(n_way: int):
    if n_way not in evaluators:
      ecfg = dataclasses.replace(mcfg, n_way=n_way).for_eval()
      frozen = jax.lax.stop_gradient(meta_params)
      ev = _chunked(lambda t: meta_lib.task_loss(frozen, t, features_fn=features_fn,
                                                 cfg=ecfg)[1]["acc"],
                    int(fcfg.get("eval_chunk", 0)), _local_devices(m))
      proto = jax.jit(jax.vmap(lambda ps, ys, pq, yq: _acc(_proto_logits(ps, ys, pq, n_way), yq)))
      evaluators[n_way] = ev, proto
    return evaluators[n_way]

  methods: dict = {}
  for split in fcfg.splits:
    arrays = arrays_lib.load_split_arrays(config.data, split, fcfg.get("max_examples", 0) or None)
    x = _resize(arrays["image"], size)
    pix = x.reshape(len(x), -1)
    pix = pix / np.maximum(np.linalg.norm(pix, axis=1, keepdims=True), 1e-6)
    for setting in fcfg.settings:
      n_way, k_shot = parse_setting(setting)
      smp = _sampler(np.arange(len(x)), arrays["label"], n_way, k_shot, int(fcfg.q_query),
                     config.seed + 17, f"{split} {setting}")
      if smp is None:
        continue
      if mcfg.head_init == "learned" and n_way != n_way_train:
        raise AdaptError(f"a learned {n_way_train}-way head cannot run {setting}; use "
                         "config.fewshot.meta.head_init='zeros'")
      ev, proto = evaluator(n_way)
      accs, paccs, done, index = [], [], 0, 0
      while done < int(fcfg.episodes):
        tcount = min(int(fcfg.episode_batch), int(fcfg.episodes) - done)
        ep = smp.sample(index, tcount)
        index += 1
        si, qi = ep["support_x"], ep["query_x"]
        task = {"support_x": x[si], "support_y": ep["support_y"], "query_x": x[qi],
                "query_y": ep["query_y"]}
        accs.append(np.asarray(ev(task)))
        paccs.append(np.asarray(proto(pix[si], ep["support_y"], pix[qi], ep["query_y"])))
        done += tcount
      methods.setdefault(f"conv4_{m.algorithm}", {}).setdefault(split, {})[setting] = summarize(
          np.concatenate(accs))
      methods.setdefault(f"pixels_protonet_{size}px", {}).setdefault(split, {})[setting] = summarize(
          np.concatenate(paccs))
      log.info("%s %s: %s %.3f, pixels %.3f", split, setting, m.algorithm,
               methods[f"conv4_{m.algorithm}"][split][setting]["mean"],
               methods[f"pixels_protonet_{size}px"][split][setting]["mean"])
  return {"methods": methods, "meta_training": {"steps": int(m.steps), "algorithm": m.algorithm,
                                                "train_setting": m.train_setting}}


# ============================================================================ outputs


def results_markdown(results: dict) -> str:
  methods = results.get("methods", {})
  splits = sorted({s for m in methods.values() for s in m})
  settings = sorted({st for m in methods.values() for s in m.values() for st in s},
                    key=lambda s: parse_setting(s))
  lines = []
  for split in splits:
    lines.append(f"\n### {split}\n")
    lines.append("| method | " + " | ".join(settings) + " |")
    lines.append("|---|" + "---:|" * len(settings))
    for name, per_split in methods.items():
      if split not in per_split:
        continue
      cells = []
      for st in settings:
        r = per_split[split].get(st)
        cells.append(f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}" if r else "")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if "zeroshot_top1" in results:
    lines.append("\n### zero-shot top-1 over each split's full class list\n")
    lines.append("| split | top-1 | classes | chance |")
    lines.append("|---|---:|---:|---:|")
    for sp, r in results["zeroshot_top1"].items():
      lines.append(f"| {sp} | {100 * r['top1']:.2f} ± {100 * r['ci95']:.2f} | "
                   f"{r['num_classes']} | {100 * r['chance']:.2f} |")
  if "dg" in results:
    dg = results["dg"]
    lines.append("\n### domain generalisation (held-out fonts): zero-shot top-1 and few-shot\n")
    dsplits = sorted({sp for v in dg["zeroshot"].values() for sp in v})
    few_cols = [(sp, m, st) for sp in dsplits for m in ("protonet", "zs_head_adapt")
                for st in sorted({st for v in dg["fewshot"].values()
                                  for st in v.get(m, {}).get(sp, {})})]
    lines.append("| variant | " + " | ".join(f"{sp} zero-shot" for sp in dsplits) + " | " +
                 " | ".join(f"{sp} {m} {st}" for sp, m, st in few_cols) + " |")
    lines.append("|---|" + "---:|" * (len(dsplits) + len(few_cols)))
    for name in dg["zeroshot"]:
      zs = [f"{100 * dg['zeroshot'][name][sp]['top1']:.2f}" for sp in dsplits]
      fw = []
      for sp, m, st in few_cols:
        r = dg["fewshot"][name].get(m, {}).get(sp, {}).get(st)
        fw.append(f"{100 * r['mean']:.1f} ± {100 * r['ci95']:.1f}" if r else "")
      lines.append(f"| {name} | " + " | ".join(zs + fw) + " |")
  return "\n".join(lines) + "\n"


def plot_shots(results: dict, out_path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = results.get("methods", {})
  splits = sorted({s for m in methods.values() for s in m})
  if not splits:
    return
  fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.6), squeeze=False)
  for ax, split in zip(axes[0], splits):
    for name, per_split in methods.items():
      res = per_split.get(split, {})
      pts = sorted(((parse_setting(st), r) for st, r in res.items() if parse_setting(st)[0] == 5),
                   key=lambda x: x[0][1])
      if pts:
        ax.errorbar([p[0][1] for p in pts], [100 * p[1]["mean"] for p in pts],
                    yerr=[100 * p[1]["ci95"] for p in pts], marker="o", capsize=3, label=name)
    ax.set_title(f"{split} (5-way)")
    ax.set_xlabel("shots")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=.3)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def run(config, workdir) -> dict:
  os.makedirs(workdir, exist_ok=True)
  from fszjax import config as config_lib

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
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(results_markdown(results))
    plot_shots(results, os.path.join(workdir, "accuracy_vs_shots.png"))
  return results
