"""Caption-dataset evaluation: image<->caption recall@K with several captions per image.

Hand-computed and brute-force checks of the recall function (ties included), the caption
evaluator on a fake encoder, and a short pretraining run of the B/16 configs' structure
(tiny model by overrides) on mocked TFDS `coco_captions` through its evaluation step.
"""

import json
import os

import numpy as np
import pytest

from fszjax import config as config_lib
from fszjax import evaluate
from fszjax import metrics as metrics_lib
from fszjax.data import defaults
from fszjax.data import arrays as arrays_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- hand-computed

# 3 images with 2, 1 and 3 captions (owners below); rows: images, columns: captions.
OWNER = np.asarray([0, 0, 1, 2, 2, 2])
SIMS = np.asarray([
    [0.90, 0.10, 0.95, 0.40, 0.30, 0.00],  # image 0: its best caption (0.90) is beaten by cap 2
    [0.50, 0.50, 0.50, 0.10, 0.10, 0.10],  # image 1: its caption ties with two wrong ones
    [0.10, 0.20, 0.30, 0.40, 0.80, 0.40],  # image 2: its caption 4 is the best
], np.float32)


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 20])
def test_first_hit_ranks_hand_computed_with_ties(chunk_elements):
  # queries @ identity = the similarity matrix itself.
  i2t = evaluate._first_hit_ranks(SIMS, np.eye(6, dtype=np.float32), np.arange(3), OWNER,
                                  chunk_elements)
  # image 0: one wrong caption (0.95) above its best (0.90) -> rank 1;
  # image 1: two wrong captions tie at 0.50 and count against it -> rank 2; image 2 -> rank 0.
  np.testing.assert_array_equal(i2t, [1, 2, 0])
  t2i = evaluate._first_hit_ranks(SIMS.T.copy(), np.eye(3, dtype=np.float32), OWNER,
                                  np.arange(3), chunk_elements)
  # cap0 -> img0 best; cap1: img1 (.5) and img2 (.2) above its .1 -> 2; cap2: img0 .95 > .5 -> 1;
  # cap3: img0 ties with img2 at .4 -> 1; cap4, cap5 -> 0.
  np.testing.assert_array_equal(t2i, [0, 2, 1, 1, 0, 0])


def test_first_hit_ranks_nan_is_a_miss():
  sims = SIMS.copy()
  sims[2] = np.nan
  ranks = evaluate._first_hit_ranks(sims, np.eye(6, dtype=np.float32), np.arange(3), OWNER, 64)
  assert ranks[2] == 3  # every wrong caption ranks above a NaN score


def test_retrieval_metrics_hand_computed_embeddings():
  # Images are the basis vectors and caption j is column j of SIMS, so the cosine of image i
  # and caption j is SIMS[i, j] / |column j|.
  m = evaluate.retrieval_metrics(np.eye(3, dtype=np.float32), SIMS.T.copy(), np.arange(3),
                                 OWNER, ks=(1, 2, 3))
  # Column norms 1.034, .548, 1.115, .574, .860, .412. i2t:
  # image 0: cap0 .870 (right) beats cap2 .852 -> rank 0;
  # image 1: its cap2 .448 is below cap0 .483 and cap1 .913 -> rank 2;
  # image 2: its cap5 .971 is the best -> rank 0.
  cos = SIMS / np.linalg.norm(SIMS, axis=0, keepdims=True)
  assert cos[0, 0] > cos[0, 2] and cos[1, 2] < cos[1, 0] < cos[1, 1] and cos[2].argmax() == 5
  assert m["i2t_r1"] == pytest.approx(2 / 3) and m["i2t_r2"] == pytest.approx(2 / 3)
  assert m["i2t_r3"] == 1.0
  # t2i: scaling a query's row keeps its order, so the ranks are the hand-computed
  # [0, 2, 1, 1, 0, 0] (cap3's tie with image 0 included).
  assert m["t2i_r1"] == pytest.approx(3 / 6) and m["t2i_r2"] == pytest.approx(5 / 6)
  assert m["t2i_r3"] == 1.0
  assert m["num_images"] == 3 and m["num_texts"] == 6


def test_retrieval_metrics_needs_a_right_item():
  with pytest.raises(ValueError, match="no right item"):
    evaluate.retrieval_metrics(np.eye(2), np.eye(2), np.asarray([0, 1]), np.asarray([0, 0]))


# ----------------------------------------------------------------------------- brute force


def _brute_recall(zimg, ztxt, img_group, txt_group, ks):
  """Sort every query's candidates by (score desc, wrong before right on ties) and find the
  position of the first right one."""
  sims = evaluate.l2_normalize(zimg) @ evaluate.l2_normalize(ztxt).T
  out = {}
  for name, s, qg, cg in (("i2t", sims, img_group, txt_group), ("t2i", sims.T, txt_group, img_group)):
    first = []
    for q in range(s.shape[0]):
      right = (cg == qg[q]).astype(int)
      order = np.lexsort((right, -s[q]))  # last key primary: -score, then wrong (0) first
      first.append(int(np.flatnonzero(right[order])[0]))
    for k in ks:
      out[f"{name}_r{k}"] = float(np.mean(np.asarray(first) < k))
  return out


def _tie_prone_embeddings(rng, n, dim, pool):
  """Rows from a small pool of vectors with four +-1 entries: exact duplicates give exact
  ties, and normalised entries are +-0.5, so every similarity is a sum of exact quarters,
  the same whatever the summation order or FMA use (chunked or not)."""
  vecs = np.zeros((pool, dim), np.float32)
  for v in vecs:
    idx = rng.choice(dim, size=4, replace=False)
    v[idx] = rng.choice([-1.0, 1.0], size=4)
  return vecs[rng.integers(0, pool, size=n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_caption_recall_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, 6, size=15)  # 1..5 captions per image
  captions = [[f"c{i}_{j}" for j in range(c)] for i, c in enumerate(counts)]
  texts, owner = evaluate.caption_groups(captions)
  assert len(texts) == counts.sum() and np.array_equal(np.bincount(owner), counts)
  zimg = _tie_prone_embeddings(rng, len(counts), 6, pool=8)
  ztxt = _tie_prone_embeddings(rng, len(texts), 6, pool=8)
  ks = (1, 2, 5, 10)
  want = _brute_recall(zimg, ztxt, np.arange(len(counts)), owner, ks)
  for chunk in (1, 13, 1 << 24):  # one row at a time, ragged chunks, whole matrix
    got = evaluate.retrieval_metrics(zimg, ztxt, np.arange(len(counts)), owner, ks=ks,
                                     chunk_elements=chunk)
    for k in want:
      assert got[k] == pytest.approx(want[k]), (k, chunk)
  # Class-style groups (many images per group, one text per group) through the same function.
  groups = rng.integers(0, 4, size=20)
  present = np.unique(groups)
  zi, zt = _tie_prone_embeddings(rng, 20, 5, 6), _tie_prone_embeddings(rng, len(present), 5, 6)
  want = _brute_recall(zi, zt, groups, present, (1, 2))
  got = evaluate.retrieval_metrics(zi, zt, groups, present, ks=(1, 2), chunk_elements=7)
  assert all(got[k] == pytest.approx(want[k]) for k in want)


# ----------------------------------------------------------------------------- evaluator


class _FakeEncoder:
  """Images are one-hot by index. Caption "i" embeds onto image i, "i+j" equally onto i and
  j, "x" equally onto every image (0.01 background everywhere)."""

  def __init__(self, n):
    self.n = n

  def images(self, images):
    return np.eye(self.n, dtype=np.float32)[np.asarray(images, np.int64)]

  def texts(self, texts):
    out = np.full((len(texts), self.n), 0.01, np.float32)
    for j, t in enumerate(texts):
      if t != "x":
        out[j, [int(i) for i in t.split("+")]] = 1.0
    return out


def test_evaluate_captions_counts_and_recall():
  # Image 2 has no caption (left out of queries and candidates).
  arrays = {"image": np.arange(4), "captions": [["0", "0", "x"], ["1"], [], ["0+3", "3"]]}
  m = evaluate.evaluate_captions(_FakeEncoder(4), arrays, ks=(1, 2))
  assert m["num_images"] == 3 and m["num_texts"] == 6 and m["images_without_captions"] == 1
  assert m["captions_per_image_min"] == 1 and m["captions_per_image_max"] == 3
  assert m["i2t_r1"] == 1.0  # every kept image has a caption pointing at it alone
  # t2i ranks: "0", "0" -> 0; "x" ties with both wrong images -> 2 (a miss at k=1 and 2);
  # "1" -> 0; "0+3" ties with the wrong image 0 -> 1; "3" -> 0.
  assert m["t2i_r1"] == pytest.approx(4 / 6) and m["t2i_r2"] == pytest.approx(5 / 6)


def test_evaluate_captions_without_any_caption_is_a_user_error():
  with pytest.raises(evaluate.EvalDataError, match="data.text_key"):
    evaluate.evaluate_captions(_FakeEncoder(2), {"image": np.arange(2), "captions": [[], []]})


def test_remap_keeps_caption_arrays():
  a = {"image": np.zeros((3, 2)), "label": np.full((3,), -1, np.int32), "class_names": None,
       "captions": [["a"], ["b"], ["c"]]}
  assert evaluate.remap_to_present(a) is a  # the former IndexError on unlabelled data


# ----------------------------------------------------------------------------- mocked coco_captions


def _coco_cfg(tmp_path):
  cfg = defaults.tfds_data_config("coco_captions", image_size=16, text_key="captions/text",
                                  label_key=None, eval_splits=("val",))
  cfg.tokenizer.vocab_size = 40
  cfg.tokenizer.cache_dir = str(tmp_path)
  cfg.num_threads = 1
  cfg.image_decoder = "tfds"  # the mock cannot encode coco's `objects` sequences
  return cfg


def test_load_split_arrays_gives_every_caption(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=6):
    a = arrays_lib.load_split_arrays(_coco_cfg(tmp_path), "val")
  assert a["class_names"] is None and (a["label"] == -1).all()
  assert len(a["captions"]) == 6 and all(isinstance(c, list) for c in a["captions"])
  assert sum(len(c) for c in a["captions"]) > 6  # several captions per image
  assert len({len(c) for c in a["captions"]}) > 1  # and not the same number for each
  for text, caps in zip(a["text"], a["captions"]):
    assert caps and text == caps[0] and all(isinstance(t, str) for t in caps)


# Tiny model, same structure as the B/16 configs (scanned layers, bf16 compute, MAP / token
# pooling, SigLIP ring or CLIP loss, fsdp over all 8 devices), their data and eval settings
# except sizes; the mock needs TFDS image decoding; no worker processes in tests.
TINY_B16 = [
    "--config.model.embed_dim=16",
    "--config.model.image.width=32", "--config.model.image.depth=2",
    "--config.model.image.mlp_dim=64", "--config.model.image.num_heads=2",
    "--config.model.image.image_size=32", "--config.model.image.patch_size=8",
    "--config.model.text.width=32", "--config.model.text.depth=2",
    "--config.model.text.mlp_dim=64", "--config.model.text.num_heads=2",
    "--config.model.text.vocab_size=64", "--config.model.text.max_len=16",
    "--config.data.image_size=32", "--config.data.max_text_len=16",
    "--config.data.tokenizer.vocab_size=64", "--config.data.num_workers=0",
    "--config.data.num_threads=1", "--config.data.image_decoder=tfds",
    "--config.batch_size=8", "--config.total_steps=2", "--config.log_every=1",
    "--config.eval_every=1", "--config.eval.batch_size=8",
    "--config.optim.warmup_steps=1",
    "--config.checkpoint.async_save=False", "--config.progress=False",
]


@pytest.mark.parametrize("config_file", ["siglip_b16.py", "clip_b16.py"])
def test_b16_structure_on_mock_coco_captions_evaluates(config_file, tmp_path):
  import tensorflow_datasets as tfds

  from fszjax import pretrain

  cfg = config_lib.load_config(os.path.join(ROOT, "configs", config_file), TINY_B16 + [
      f"--config.data.tokenizer.cache_dir={tmp_path / 'tok'}",
      f"--config.data.data_dir={tmp_path / 'data'}"])
  assert cfg.data.name == "coco_captions" and cfg.data.text_key == "captions/text"
  assert cfg.data.label_key is None and list(cfg.eval.splits) == ["val"]
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=12):
    summary = pretrain.train(cfg, workdir)
  assert summary["steps"] == 2 and not summary["stopped_early"]
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  assert on_disk["zeroshot"] == {}  # no labels: no zero-shot classification
  ret = on_disk["retrieval"]["val"]
  assert ret["num_images"] == 12 and ret["num_texts"] > 12
  assert ret["captions_per_image_min"] >= 1 and ret["images_without_captions"] == 0
  for d in ("i2t", "t2i"):
    r = [ret[f"{d}_r{k}"] for k in (1, 5, 10)]
    assert all(0.0 <= x <= 1.0 for x in r) and r[0] <= r[1] <= r[2], (d, r)
    assert r[2] > 0  # 10 of 12 images (or of many captions): chance alone is far above 0
  # t2i with 12 candidate images: recall@10 misses only captions whose image ranks 11th/12th.
  assert ret["t2i_r10"] >= 0.5
  # The evaluation rows in metrics.jsonl carry the flattened recalls at steps 1 and 2.
  rows = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  eval_rows = [r for r in rows if "retrieval/val/i2t_r1" in r]
  assert [r["step"] for r in eval_rows] == [1, 2]
  assert eval_rows[-1]["retrieval/val/t2i_r5"] == ret["t2i_r5"]
  if config_file == "siglip_b16.py":
    # `fszjax eval` restores the checkpoint (onto the default data-parallel mesh) and
    # evaluates the caption split the same way.
    from fszjax import train_cli

    with tfds.testing.mock_data(num_examples=12):
      result = train_cli.evaluate_checkpoint(workdir, None, [])
    assert result["steps"] == 2 and result["zeroshot"] == {}
    again = result["retrieval"]["val"]
    assert again["num_images"] == 12 and again["num_texts"] == ret["num_texts"]
    assert all(0.0 <= again[f"t2i_r{k}"] <= 1.0 for k in (1, 5, 10))
    assert again["t2i_r1"] <= again["t2i_r5"] <= again["t2i_r10"]


def test_remap_edge_cases():
  empty = {"image": np.zeros((0, 2)), "label": np.zeros((0,), np.int32), "class_names": ["a"]}
  assert evaluate.remap_to_present(empty) is empty  # run_evaluators names the empty split
  unlabelled = {"label": np.asarray([0, -1]), "class_names": ["a", "b"]}
  with pytest.raises(evaluate.EvalDataError, match="data.label_key"):
    evaluate.remap_to_present(unlabelled)
  m = evaluate.remap_to_present({"label": np.asarray([3, 1, 3]), "class_names": list("abcd")})
  assert m["label"].tolist() == [1, 0, 1] and m["class_names"] == ["b", "d"]
