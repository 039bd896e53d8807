"""`fszjax adapt` with the pretrained towers (``fewshot.backbone='towers'``): the few-shot
tables on frozen features, the two-tower transfer methods (`fszjax.fewshot.transfer`),
meta-training of the image tower (ANIL from the zero-shot head) and domain generalisation
(`fszjax.fewshot.dg_adaptor`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import jax.numpy as jnp
import numpy as np

from fszjax import evaluate, inference
from fszjax import metrics as metrics_lib
from fszjax.data import errors as data_errors, sources
from fszjax.data.episodes import EpisodeSampler
from fszjax.data.preprocess import stroke_jitter, stroke_probability
from fszjax.fewshot import inner as inner_lib
from fszjax.fewshot import meta as meta_lib
from fszjax.fewshot import transfer
from fszjax.fewshot.dg_adaptor import run_dg
from fszjax.fewshot.episodes import (AdaptError, SplitData, episodes_on_features,
                                     few_shot_table, parse_setting, summarize, zeroshot_top1)
from fszjax.fewshot.eval_data import (eval_data_config, eval_splits, image_feats, load_towers,
                                      split_data)
from fszjax.fewshot.meta_loop import meta_train, tasks_of
from fszjax.fewshot.tower_tuning import (check_config as tuning_check_config,
                                         evaluate_inner_loop, parse_adapt, run_tuning)
from fszjax.models.two_tower import TwoTower, build_image_tower

log = logging.getLogger("fszjax")


def run_towers(config, workdir) -> dict:
  fcfg = config.fewshot
  pre, base_dir, model, params = load_towers(config)
  data_cfg = eval_data_config(pre.data, config.data)
  tokenizer = inference.model_tokenizer(pre, base_dir)  # the model's own, never the data's
  encoder = evaluate.EmbeddingEncoder(model, params, tokenizer, max_len=pre.model.text.max_len)
  splits = eval_splits(fcfg, data_cfg)
  log.info("evaluating %s (%s) on %s splits %s", base_dir, type(tokenizer).__name__,
           data_cfg.name, ", ".join(splits))
  t, b = model.apply({"params": params}, method=TwoTower.scale_and_bias)
  scale = float(jnp.exp(t))
  bias = float(b) if b is not None else 0.0
  templates = list(sources.prompt_templates(data_cfg))
  meta_on = bool(fcfg.meta.enabled)
  transfer_on = bool(fcfg.transfer.enabled)
  tuning_on = transfer_on and bool(fcfg.transfer.finetune.enabled)
  keep_images = meta_on or tuning_on  # the methods that run the image tower per episode
  _check_before_work(fcfg, meta_on, tuning_on)
  data = {}
  for split in splits:
    try:
      data[split] = split_data(encoder, data_cfg, split, templates,
                                fcfg.max_examples or None, keep_images=keep_images)
    except data_errors.DataError as e:
      raise AdaptError(f"{e} (evaluation data of `fszjax adapt`: choose it with "
                       "--config.data.name=..., --config.data.data_dir=... and "
                       "--config.fewshot.splits=[...])") from None
    log.info("features of %s: %d images, %d classes", split, len(data[split].labels),
             len(data[split].class_names))
  samplers: dict = {}
  results = {"methods": few_shot_table(data, fcfg, scale, bias, config.seed, samplers=samplers),
             "zeroshot_top1": {sp: zeroshot_top1(d.feats, d) for sp, d in data.items()}}
  train = None
  dg_on = bool(fcfg.dg.enabled) and any(sp in data for sp in fcfg.dg.splits)
  if fcfg.dg.enabled and not dg_on:
    log.info("domain generalisation skipped: none of config.fewshot.dg.splits=%s is evaluated",
             list(fcfg.dg.splits))
  if dg_on or meta_on or transfer_on:  # loaded once for all
    train = split_data(encoder, data_cfg, data_cfg.train_split, templates,
                        fcfg.max_train_examples or None, keep_images=keep_images)
  if transfer_on:  # the selection split, loaded once (re-encoded for a meta-trained tower)
    val = _selection_split(encoder, data_cfg, fcfg.transfer.val_split, templates, keep_images)
    tr = transfer_towers(config, train, val, data, scale, bias, samplers)
    results["methods"].update(tr.pop("methods"))
    results.update(tr)
  if tuning_on:
    with metrics_lib.timed("per-episode fine-tuning of the image tower (tower_finetune, lp_ft)",
                           log):
      tuned = run_tuning(config, tower_features_fn(build_image_tower(pre.model), "anil", scale),
                         params["img"], selection_pools(train, val), data, scale, bias, samplers)
    results["methods"].update(tuned.pop("methods"))
    results.update(tuned)
  if meta_on:
    with metrics_lib.timed(f"meta-training ({fcfg.meta.algorithm}) of the image tower and its "
                           "evaluation", log):
      meta, meta_enc, meta_data = meta_towers(config, workdir, pre.model, model, params,
                                              encoder, train, data, scale, bias, samplers)
    results["methods"].update(meta.pop("methods"))
    results.update(meta)
    if transfer_on and fcfg.meta.algorithm == "protonet":
      # Both towers on the meta-trained image tower: the same val-selected methods.
      tr = transfer_towers(config, reencoded(meta_enc, train), reencoded(meta_enc, val),
                           meta_data, scale, bias, samplers)
      results["methods"].update({f"{k}_meta": v for k, v in tr["methods"].items()})
      results["transfer_selection_meta"] = tr["transfer_selection"]
  if dg_on:
    evals = {sp: data[sp] for sp in fcfg.dg.splits if sp in data}
    with metrics_lib.timed(f"domain generalisation (ERM, MLDG, WiSE-FT) on {list(evals)}", log):
      results["dg"] = run_dg(config, train, evals, scale, bias, fcfg)
  return results


def _check_before_work(fcfg, meta_on: bool, tuning_on: bool) -> None:
  """The settings that would otherwise fail only after the frozen-tower evaluation."""
  stroke_probability(fcfg.meta.stroke, "config.fewshot.meta.stroke")
  if tuning_on:
    tuning_check_config(fcfg.transfer.finetune)
  if meta_on:
    towers_meta_cfg(fcfg, 1.0, 0.0)  # algorithm and adapt


def _selection_split(encoder, data_cfg, split: str, templates, keep_images: bool) -> SplitData:
  try:
    return split_data(encoder, data_cfg, split, templates, None, keep_images=keep_images)
  except data_errors.DataError as e:
    raise AdaptError(f"{e} (the split that selects the transfer methods' hyper-parameters: "
                     "set --config.fewshot.transfer.val_split to a validation split of the "
                     "evaluation data (Glyphs: val_classes, Glyphs >= 1.1.0; re-run "
                     "`fszjax prepare glyphs`), or --config.fewshot.transfer.enabled=False)"
                     ) from None


def _domain_keys(d: SplitData) -> np.ndarray:
  return np.asarray(d.domain_names) if d.domain_names is not None else np.asarray(d.domains)


def reencoded(encoder, d: SplitData) -> SplitData:
  """`d` with the image features of `encoder` (its text classifier is the text tower's,
  which meta-training of the image tower leaves as it is)."""
  return dataclasses.replace(d, feats=image_feats(encoder, d.images))


def selection_pools(train: SplitData, val: SplitData) -> dict:
  """Where the selection episodes' supports and queries come from. A val split of train
  classes (Glyphs ``val``: held-out examples of train characters): queries from val,
  supports from train in other fonts, in train's label space. A val split of its own
  classes (Glyphs ``val_classes``: characters never trained on): both from val, support
  and query in different fonts."""
  name_to_train = {n: i for i, n in enumerate(train.class_names)}
  vy = np.asarray([name_to_train.get(val.class_names[int(l)], -1) for l in val.labels])
  if len(vy) and np.all(vy >= 0):
    return {"support": (train.feats, train.labels, _domain_keys(train)), "text": train.text,
            "query": (val.feats, vy, _domain_keys(val)), "images": (train.images, val.images)}
  own = (val.feats, np.asarray(val.labels), _domain_keys(val))
  return {"support": own, "text": val.text, "query": own, "images": (val.images, val.images)}


def _selection_args(pools: dict, n_way: int, k_shot: int, episodes: int, seed: int):
  (sf, sl, sd), (qf, ql, qd) = pools["support"], pools["query"]
  eps = transfer.cross_font_episodes(sl, sd, ql, qd, n_way=n_way, k_shot=k_shot,
                                     episodes=episodes, seed=seed)
  if eps is None:
    return None
  return (sf[eps["support"]], eps["support_y"], qf[eps["query"]], eps["query_y"],
          pools["text"][eps["classes"]])


def transfer_towers(config, train: SplitData, val: SplitData, data: dict[str, SplitData],
                    scale: float, bias: float, samplers: dict) -> dict:
  """`fszjax.fewshot.transfer`'s methods on the splits' features (of the frozen or of the
  meta-trained tower; `val` and `train` encoded by the same one): hyper-parameters chosen per
  setting by the lowest log-loss on cross-font episodes of ``val`` (`selection_pools`),
  then evaluated on the same episodes as the other methods. Returns ``{"methods": ...,
  "transfer_selection": {setting: chosen}}``."""
  fcfg, tcfg = config.fewshot, config.fewshot.transfer
  pools = selection_pools(train, val)

  def proto_grid(weights):
    g = transfer.grid({**weights, "steps": list(tcfg.steps), "lr": list(tcfg.lrs)})
    return [c for c in g if c["steps"] > 0 or c["lr"] == tcfg.lrs[0]]

  tip_grid = transfer.grid({"alpha": list(tcfg.alphas), "beta": list(tcfg.betas)})
  chosen, methods = {}, {}
  gate = bool(tcfg.gate)
  for setting in fcfg.settings:
    n_way, k_shot = parse_setting(setting)
    args = _selection_args(pools, n_way, k_shot, int(tcfg.val_episodes), config.seed + 101)
    if args is None:
      log.warning("transfer: %s has too few classes with examples in two fonts for %s; "
                  "skipped", tcfg.val_split, setting)
      continue

    # >= 2 shots: the prototype / zero-shot mix per task by leave-one-out on the support
    # set (over proto_weights); val chooses the SGD steps and rate only.
    cv = tuple(tcfg.proto_weights) if tcfg.support_cv and k_shot >= 2 else None

    def score(c, m, base):
      hp = {"proto_weight": 1.0, **base, **c}
      # Tip-Adapter's candidates run proto_zs_adapt at 0 steps: no leave-one-out needed.
      cv_m = cv if m == "proto_zs_adapt" else None
      out = transfer.make_feature_scores(n_way, scale, bias, **hp, gate=gate,
                                         cv_weights=cv_m)(*args)[m]
      return {k: np.mean(np.asarray(v)) for k, v in out.items()}

    tip0 = {"alpha": float(tcfg.alphas[0]), "beta": float(tcfg.betas[0])}
    pz = transfer.select_on_val(
        lambda c: score(c, "proto_zs_adapt", tip0),
        proto_grid({} if cv else {"proto_weight": list(tcfg.proto_weights)}),
        f"proto_zs_adapt {setting}")
    tip = transfer.select_on_val(
        lambda c: score(c, "tip_adapter", {"proto_weight": 1.0, "steps": 0, "lr": 0.0}),
        tip_grid, f"tip_adapter {setting}")
    fn = transfer.make_feature_eval(
        n_way, scale, bias, float(pz.get("proto_weight", 1.0)), int(pz["steps"]),
        float(pz["lr"]), float(tip["alpha"]), float(tip["beta"]), gate, cv_weights=cv)
    if cv:  # no proto_weight was chosen: each task picks one of these on its support set
      pz["support_cv_weights"] = list(cv)
    chosen[setting] = {"proto_zs_adapt": pz, "tip_adapter": tip}
    for split, d in data.items():
      sampler = samplers.get((split, setting, config.seed))
      if sampler is None:
        continue
      accs = episodes_on_features(sampler, int(fcfg.episodes), int(fcfg.episode_batch), fn,
                                   d.feats, d.text, d.pix)
      for m, a in accs.items():
        methods.setdefault(m, {}).setdefault(split, {})[setting] = summarize(a)
  return {"methods": methods, "transfer_selection": chosen}


# Meta-learners of the image tower: ANIL / MAML / FOMAML adapt the zero-shot head in the
# inner loop; ProtoNets has no inner loop (the whole tower learns from the episodes' query
# loss on distances to the support prototypes).
TOWER_META_ALGORITHMS = ("protonet", "anil", "fomaml", "maml")


def towers_meta_cfg(fcfg, scale: float, bias: float) -> meta_lib.MetaConfig:
  """Meta-learning of the image tower. ANIL / MAML / FOMAML start from the zero-shot head:
  the inner loop is the one `zs_head_adapt` evaluates (``head_steps`` SGD steps of
  ``head_lr`` from the text tower's classifier), so at evaluation the meta-trained tower
  runs that same method. ProtoNets trains the tower on the metric ProtoNets evaluates."""
  m = fcfg.meta
  if m.algorithm not in TOWER_META_ALGORITHMS:
    raise AdaptError(f"config.fewshot.meta.algorithm={m.algorithm!r} for the towers: use one of "
                     f"{', '.join(TOWER_META_ALGORITHMS)}")
  n_way, _ = parse_setting(m.train_setting)
  if m.algorithm == "protonet":
    return meta_lib.MetaConfig(algorithm="protonet", n_way=n_way, inner_steps=0,
                               task_chunk=int(m.task_chunk))
  return meta_lib.MetaConfig(
      algorithm=m.algorithm, n_way=n_way, inner_steps=int(fcfg.head_steps),
      inner_lr=float(fcfg.head_lr), adapt=tower_adapt(m.adapt), first_order=bool(m.first_order),
      remat=bool(m.remat), head_init="zeroshot", logit_scale=scale,
      logit_bias=bias, task_chunk=int(m.task_chunk))


def tower_adapt(value):
  """``fewshot.meta.adapt`` for the towers: 'head' (ANIL-style: the zero-shot head only,
  evaluated on re-encoded features), or the last k blocks ('1', '2', ...) or the whole tower
  ('all') with the head: evaluated by running that same inner loop on each episode's images."""
  if value == "head":
    return "head"
  try:
    return parse_adapt(value)
  except AdaptError:
    raise AdaptError(f"config.fewshot.meta.adapt={value!r} for the towers: use 'head', a number "
                     "of last blocks (e.g. '1') or 'all'") from None


def tower_features_fn(tower, algorithm: str, scale: float):
  """``f(backbone, images) -> features`` the meta-learner trains: the normalised image
  embedding, times ``sqrt(scale / 2)`` for ProtoNets, so that its logits
  ``-|q - c|^2 = scale * q.c - const`` sit at the model's own (learned) temperature."""
  mult = float(np.sqrt(scale / 2.0)) if algorithm == "protonet" else 1.0

  def features_fn(backbone, x):
    z, _ = tower.apply({"params": backbone}, x)
    return inner_lib.l2_normalize(z) * mult

  return features_fn


def jittered(episode: dict, stroke: float, seed: int, step: int) -> dict:
  """`episode` with `stroke_jitter` applied to its support and query images, seeded by
  ``(seed, step)`` so a resumed meta-training run draws the same images."""
  if not stroke:
    return episode
  rng = np.random.default_rng([int(seed), int(step), 0x5770CE])
  return {**episode,
          **{k: stroke_jitter(episode[k], rng, stroke) for k in ("support_x", "query_x")}}


# The methods each meta-learner is evaluated with on the re-encoded splits, and their names.
_META_METHODS = {"protonet": {"protonet": "protonet_meta", "zeroshot": "protonet_meta_zeroshot"}}


def meta_towers(config, workdir, model_cfg, model, params, encoder, train: SplitData,
                 data: dict[str, SplitData], scale: float, bias: float, samplers: dict) -> dict:
  """Meta-trains the image tower on train-split tasks (a class has one image per font, so
  the support and query images of a task are always in different fonts), then re-encodes
  every evaluation split and reports, for ANIL & co., ``{alg}`` (zero-shot head adapted on
  the meta-trained tower; with ``meta.adapt`` = k blocks or 'all', that inner loop run on
  each episode's images, on ``transfer.finetune.episodes`` episodes) and ``{alg}_zeroshot``;
  for ProtoNets ``protonet_meta`` and ``protonet_meta_zeroshot``. Returns ``(results, encoder of the meta-trained towers, the
  re-encoded splits)``."""
  fcfg, m = config.fewshot, config.fewshot.meta
  mcfg = towers_meta_cfg(fcfg, scale, bias)
  features_fn = tower_features_fn(build_image_tower(model_cfg), m.algorithm, scale)
  n_way, k_shot = parse_setting(m.train_setting)
  sampler = EpisodeSampler(train.images, train.labels, n_way=n_way, k_shot=k_shot,
                           q_query=int(m.q_query), seed=config.seed)
  text = None if m.algorithm == "protonet" else train.text
  t0 = time.perf_counter()
  meta_params = meta_train(config, os.path.join(workdir, "meta_checkpoints"), features_fn, mcfg,
                           {"backbone": params["img"]},
                           lambda step: tasks_of(jittered(sampler.sample(step, int(m.meta_batch)),
                                                          float(m.stroke), config.seed, step),
                                                 text))
  train_s = time.perf_counter() - t0
  enc = evaluate.EmbeddingEncoder(model, {**params, "img": meta_params["backbone"]}, encoder.tokenizer,
                         max_len=encoder.max_len)
  meta_data = {sp: reencoded(enc, d) for sp, d in data.items()}
  names = _META_METHODS.get(m.algorithm, {"zs_head_adapt": m.algorithm,
                                          "zeroshot": f"{m.algorithm}_zeroshot"})
  per_episode = mcfg.algorithm != "protonet" and mcfg.adapt != "head"
  if per_episode:  # the inner loop adapts tower blocks: re-encoded features cannot show it
    names = {"zeroshot": f"{m.algorithm}_zeroshot"}
  table = few_shot_table(meta_data, fcfg, scale, bias, config.seed, methods=tuple(names),
                         samplers=samplers)
  methods = {names[k]: v for k, v in table.items()}
  if per_episode:
    methods[m.algorithm] = evaluate_inner_loop(config, features_fn, meta_params, mcfg, data,
                                               samplers)
  out = {"methods": methods,
         "meta_training": {"steps": int(m.steps), "algorithm": m.algorithm,
                           "train_setting": m.train_setting, "meta_batch": int(m.meta_batch),
                           "wall_time_s": train_s},
         "zeroshot_top1_meta": {sp: zeroshot_top1(d.feats, d) for sp, d in meta_data.items()}}
  return out, enc, meta_data
