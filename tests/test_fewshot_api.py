"""`model.few_shot(...)` (fszjax.fewshot.api) and README's runnable Python snippets."""

import os
import re

import numpy as np
import pytest

import data_testlib
import fszjax
from fszjax import config as config_lib, pretrain
from fszjax.data import arrays
from fszjax.errors import UserError
from fszjax.fewshot import api, inner
from test_portable_workdir import TINY_RUN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  gdir = data_testlib.glyphs_data_dir(tmp_path_factory)
  wd = str(tmp_path_factory.mktemp("api_pre"))
  cfg = config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"),
                               [f"--config.data.data_dir={gdir}"] + TINY_RUN)
  pretrain.train(cfg, wd)
  return wd


@pytest.fixture(scope="module")
def task(run):
  model = fszjax.load(run)
  data = arrays.load_split_arrays(model.config.data, "test_classes")
  t = api.split_task(data["label"], n_way=5, k_shot=3, seed=1)
  names = [data["class_names"][c] for c in t.classes]
  return model, data["image"][t.support], t.support_y, data["image"][t.query], t.query_y, names


def runnable_blocks(text: str) -> list[str]:
  """```python blocks preceded by a `<!-- runnable ... -->` line."""
  return re.findall(r"<!-- runnable[^\n]*-->\n```python\n(.*?)```", text, flags=re.S)


def test_readme_snippets_run_and_few_shot_beats_zero_shot(run, tmp_path, monkeypatch):
  blocks = runnable_blocks(open(os.path.join(ROOT, "README.md")).read())
  assert len(blocks) >= 2 and any("few_shot" in b for b in blocks)
  os.makedirs(tmp_path / "runs" / "glyphs")
  os.symlink(run, tmp_path / "runs" / "glyphs" / "pretrain")
  monkeypatch.chdir(tmp_path)
  for block in blocks:
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102
    if "few_shot" in block:
      n_queries = len(ns["task"].query)
      assert n_queries >= 60
      # 10 classes: chance is 0.1; the few-shot classifier must beat zero-shot clearly
      # (0.25 is more than 4 binomial standard deviations at this query count).
      assert ns["acc"] >= ns["zs_acc"] + 0.25, (ns["acc"], ns["zs_acc"])
    else:
      assert np.isfinite(ns["metrics"]["loss"])


def test_methods_agree_where_they_must(task):
  model, sx, sy, qx, qy, names = task
  zs = model.few_shot(None, None, class_names=names, method="zeroshot").logits(qx)
  # The zero-shot head is the text tower's classifier: scale * cos (+ bias).
  ref = model.logit_scale * model.encode_image(qx) @ model.zero_shot_classifier(names).T
  np.testing.assert_allclose(zs, ref + (model.logit_bias or 0.0), rtol=1e-4, atol=1e-4)
  for method in ("zs_head_adapt", "finetune"):  # 0 steps: exactly zero-shot
    out = model.few_shot(sx, sy, class_names=names, method=method, steps=0).logits(qx)
    np.testing.assert_allclose(out, zs, rtol=1e-4, atol=1e-4)
  head = model.few_shot(sx, sy, class_names=names, method="zs_head_adapt", steps=5)
  assert np.abs(head.logits(qx) - zs).max() > 1e-3
  w0 = model.few_shot(sx, sy, class_names=names, method="wise_ft", steps=5, alpha=0.0)
  w1 = model.few_shot(sx, sy, class_names=names, method="wise_ft", steps=5, alpha=1.0)
  wh = model.few_shot(sx, sy, class_names=names, method="wise_ft", steps=5, alpha=0.5)
  np.testing.assert_allclose(w0.logits(qx), zs, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(w1.logits(qx), head.logits(qx), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(wh.logits(qx), 0.5 * (zs + head.logits(qx)), rtol=1e-4, atol=1e-3)
  # ProtoNets: logits = -|f - c|^2 + |f|^2 (= 1 for normalised features).
  proto = model.few_shot(sx, sy, method="protonet")
  fs, fq = model.encode_image(sx), model.encode_image(qx)
  c = np.stack([fs[sy == k].mean(0) for k in range(len(names))])
  d2 = ((fq[:, None, :] - c[None]) ** 2).sum(-1)
  np.testing.assert_allclose(proto.logits(qx), 1.0 - d2, atol=1e-4)


def test_proto_zs_is_protonets_or_the_names_at_its_ends_and_the_adapt_jobs_head(task):
  import jax.numpy as jnp

  from fszjax.fewshot import transfer

  model, sx, sy, qx, _, names = task
  zs = model.few_shot(None, None, class_names=names, method="zeroshot")
  proto = model.few_shot(sx, sy, method="protonet")
  # proto_weight 1, 0 steps: ProtoNets' decision rule (its logits times the logit scale).
  p1 = model.few_shot(sx, sy, class_names=names, method="proto_zs", proto_weight=1.0, steps=0)
  np.testing.assert_array_equal(p1.predict(qx), proto.predict(qx))
  np.testing.assert_allclose(p1.logits(qx), model.logit_scale * proto.logits(qx),
                             rtol=1e-4, atol=1e-3)
  # proto_weight 0, 0 steps: the zero-shot classifier.
  p0 = model.few_shot(sx, sy, class_names=names, method="proto_zs", proto_weight=0.0, steps=0)
  np.testing.assert_allclose(p0.logits(qx), zs.logits(qx), rtol=1e-4, atol=1e-4)
  # Default (3 shots): the leave-one-out mix + 100 SGD steps of `fszjax adapt`'s function.
  got = model.few_shot(sx, sy, class_names=names, method="proto_zs")
  fs = jnp.asarray(model.encode_image(sx))
  text = jnp.asarray(model.zero_shot_classifier(names))
  want = transfer.proto_zeroshot_adapt(
      fs, jnp.asarray(sy), jnp.asarray(model.encode_image(qx)), text, len(names),
      model.logit_scale, model.logit_bias or 0.0, 0.5, 100, 8.0, True, api.PROTO_ZS_WEIGHTS)
  np.testing.assert_allclose(got.logits(qx), np.asarray(want), rtol=1e-4, atol=1e-3)
  with pytest.raises(api.FewShotError, match="proto_weight"):
    model.few_shot(sx, sy, class_names=names, method="proto_zs", proto_weight=2.0)


def test_finetune_changes_only_the_last_block_and_is_cached(task):
  from fszjax.tree import flatten

  model, sx, sy, qx, _, names = task
  ft = model.few_shot(sx, sy, class_names=names, method="finetune", steps=3, blocks=1)
  before, after = flatten(model.params["img"]), flatten(ft.backbone)
  changed = {k for k in before if np.abs(np.asarray(before[k]) - np.asarray(after[k])).max() > 0}
  assert changed and all("block_0" in k for k in changed), sorted(changed)
  assert ft.logits(qx).shape == (len(qx), len(names))
  n = len(model._fewshot_jit)
  model.few_shot(sx, sy, class_names=names, method="finetune", steps=3, blocks=1)
  assert len(model._fewshot_jit) == n  # same settings and shapes: no new jitted function


def test_raw_images_and_string_labels(task):
  from PIL import Image

  model, sx, sy, qx, _, names = task
  mean, std = float(model.mean[0]), float(model.std[0])
  to_raw = lambda x: np.round((x[..., 0] * std + mean) * 255).astype(np.uint8)
  pil_support = [Image.fromarray(im) for im in to_raw(sx)]
  by_name = model.few_shot(pil_support, [names[y] for y in sy], method="zs_head_adapt")
  by_index = model.few_shot(sx, sy, class_names=names, method="zs_head_adapt")
  assert by_name.labels == sorted(names)  # columns: the label values, sorted
  cols = [by_name.labels.index(n) for n in names]
  np.testing.assert_allclose(by_name.logits(to_raw(qx)[..., None])[:, cols], by_index.logits(qx),
                             atol=1e-4)
  pred = by_name.predict([Image.fromarray(im) for im in to_raw(qx[:4])])
  assert set(pred) <= set(names)  # predictions in the support labels' terms
  np.testing.assert_array_equal(pred, np.asarray(names)[by_index.predict(qx[:4])])
  p = by_name.predict_proba(qx[:4])
  np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)


def test_bad_input_is_one_line_error(task):
  model, sx, sy, _, _, names = task
  with pytest.raises(api.FewShotError, match="use one of"):
    model.few_shot(sx, sy, class_names=names, method="maml")
  with pytest.raises(api.FewShotError, match="pass class_names"):
    model.few_shot(sx, sy, method="zs_head_adapt")
  with pytest.raises(api.FewShotError, match="integers in"):
    model.few_shot(sx, sy + 10, class_names=names, method="protonet")
  with pytest.raises(api.FewShotError, match="not in class_names"):
    model.few_shot(sx, ["nope"] * len(sy), class_names=names, method="protonet")
  with pytest.raises(api.FewShotError, match="only 2 classes"):
    api.split_task(np.array([0, 0, 1, 1, 1]), n_way=3, k_shot=1)
  assert issubclass(api.FewShotError, UserError)
  assert inner.zeroshot_head  # the API builds on the library's heads
