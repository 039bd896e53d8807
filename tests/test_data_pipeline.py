"""grain pipelines: batches, determinism, exact resume, process sharding, mixtures, errors,
catalog datasets through `tfds.testing.mock_data`, and users' own folders / captions."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from data_testlib import glyph_cfg, glyphs_data_dir, write_image_folder

from fszjax.data import defaults, image_text
from fszjax.data.preprocess import ExampleProcessor, stroke_jitter
from fszjax.data import arrays, errors as data_errors, pipeline, sources, vocab


@pytest.fixture(scope="session")
def gdata(tmp_path_factory):
  return glyphs_data_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
  """A prepared image folder: 3 classes x 8 distinct gray images (no augmentation needed)."""
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  base = tmp_path_factory.mktemp("folder")
  root = write_image_folder(str(base / "imgs"), per_class=8)
  data_dir = str(base / "data")
  image_text.prepare_image_folder(root, "animals", data_dir=data_dir)
  return data_dir


def folder_cfg(data_dir, **kw):
  cfg = defaults.tfds_data_config("user_image_folder/animals", image_size=8, text_key=None)
  cfg.data_dir = data_dir
  cfg.channels, cfg.mean, cfg.std = 1, (0.0,), (1.0,)
  cfg.augment.random_resized_crop = False
  cfg.tokenizer.vocab_size = 40
  cfg.num_threads = 1
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def ids(batches):
  """Example identities of the gray-level folder dataset: the (constant) image value."""
  return [int(round(float(v) * 255)) for b in batches for v in b["image"].reshape(len(b["image"]), -1)[:, 0]]


# ----------------------------------------------------------------------------- glyphs


def test_glyph_batches_have_the_documented_shapes(gdata):
  cfg = glyph_cfg(gdata)
  it = pipeline.make_train_iterator(cfg, global_batch=8, seed=0, process_index=0, process_count=2)
  b = next(it)
  assert set(b) == {"image", "tokens", "label"}
  assert b["image"].shape == (4, 32, 32, 1) and b["image"].dtype == np.float32
  assert b["tokens"].shape == (4, 16) and b["tokens"].dtype == np.int32
  assert b["label"].shape == (4,) and b["label"].dtype == np.int32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  tok = vocab.get_tokenizer(cfg)
  assert tok.vocab_size == 256 and (b["tokens"].max(axis=1) == tok.eot_id).all()
  names = sources.class_names(cfg, "train")
  assert tok.decode(b["tokens"]) == [names[i] for i in b["label"]]


def test_same_seed_same_batches(gdata):
  cfg = glyph_cfg(gdata)
  a = take(pipeline.make_train_iterator(cfg, global_batch=8, seed=3, process_index=0, process_count=1), 3)
  b = take(pipeline.make_train_iterator(cfg, global_batch=8, seed=3, process_index=0, process_count=1), 3)
  c = take(pipeline.make_train_iterator(cfg, global_batch=8, seed=4, process_index=0, process_count=1), 1)
  assert_same(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_restored_iterator_continues_exactly(gdata):
  cfg = glyph_cfg(gdata)
  it = pipeline.make_train_iterator(cfg, global_batch=8, seed=1, process_index=0, process_count=1)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what the Orbax handler stores
  expected = take(it, 3)
  fresh = pipeline.make_train_iterator(cfg, global_batch=8, seed=1, process_index=0, process_count=1)
  fresh.set_state(state)
  assert_same(take(fresh, 3), expected)


def test_grain_orbax_checkpoint_handler(gdata, tmp_path):
  import grain
  from etils import epath

  cfg = glyph_cfg(gdata)
  it = pipeline.make_train_iterator(cfg, global_batch=4, seed=2, process_index=0, process_count=1)
  take(it, 2)
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
  expected = take(it, 2)
  fresh = pipeline.make_train_iterator(cfg, global_batch=4, seed=2, process_index=0, process_count=1)
  handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(fresh))
  assert_same(take(fresh, 2), expected)


def test_load_split_arrays_and_class_names(gdata):
  cfg = glyph_cfg(gdata)
  a = arrays.load_split_arrays(cfg, "test_classes", max_examples=20)
  n = len(a["label"])
  assert n == 20 and a["image"].shape == (20, 32, 32, 1) and a["image"].dtype == np.float32
  assert a["class_names"] == sources.class_names(cfg, "test_classes")
  assert [a["class_names"][i] for i in a["label"]] == a["text"]
  assert len(a["font"]) == n and (a["domain"] >= 0).all() and len(a["script"]) == n
  b = arrays.load_split_arrays(cfg, "test_fonts", max_examples=5)
  assert b["class_names"] == sources.class_names(cfg, "train")  # shares the train label space
  assert all("{}" in t for t in sources.prompt_templates(cfg))


def test_unprepared_glyphs_names_the_command(tmp_path):
  cfg = glyph_cfg(str(tmp_path))
  with pytest.raises(data_errors.DataNotPreparedError) as e:
    pipeline.make_train_iterator(cfg, global_batch=4, seed=0, process_index=0, process_count=1)
  msg = str(e.value)
  assert "\n" not in msg and f"fszjax prepare glyphs --data_dir {tmp_path}" in msg


def test_unprepared_catalog_dataset_names_the_command(tmp_path):
  cfg = defaults.tfds_data_config("cifar10")
  cfg.data_dir = str(tmp_path)
  with pytest.raises(data_errors.DataNotPreparedError) as e:
    arrays.load_split_arrays(cfg, "test")
  msg = str(e.value)
  assert "\n" not in msg and f"fszjax prepare tfds cifar10 --data_dir {tmp_path}" in msg


def test_unknown_feature_key_lists_available_keys(gdata):
  cfg = glyph_cfg(gdata, label_key="class_id")
  with pytest.raises(data_errors.FeatureKeyError) as e:
    arrays.load_split_arrays(cfg, "val")
  msg = str(e.value)
  assert "'class_id'" in msg and "data.label_key" in msg
  for key in ("codepoint", "font", "image", "label", "text"):
    assert key in msg


def test_unknown_split_lists_available_splits(gdata):
  with pytest.raises(data_errors.DataError, match="available splits: .*test_scripts"):
    arrays.load_split_arrays(glyph_cfg(gdata), "validation")


# ----------------------------------------------------------------------------- sharding


def test_process_shards_are_disjoint_and_cover_an_epoch(folder):
  cfg = folder_cfg(folder)  # 24 examples, each a distinct gray level
  shards = []
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, global_batch=8, seed=0, process_index=p, process_count=2)
    shards.append(ids(take(it, 3)))  # 3 x 4 = 12 per process = one epoch together
  assert len(set(shards[0])) == 12 and len(set(shards[1])) == 12
  assert not set(shards[0]) & set(shards[1])
  assert len(set(shards[0]) | set(shards[1])) == 24


def test_epochs_are_reshuffled_and_complete(folder):
  cfg = folder_cfg(folder)
  it = pipeline.make_train_iterator(cfg, global_batch=8, seed=0, process_index=0, process_count=1)
  e1, e2 = ids(take(it, 3)), ids(take(it, 3))
  assert sorted(e1) == sorted(e2) and len(set(e1)) == 24
  assert e1 != e2


def test_global_batch_must_divide(folder):
  with pytest.raises(data_errors.DataError, match="multiple of 3"):
    pipeline.make_train_iterator(folder_cfg(folder), global_batch=8, seed=0, process_index=0, process_count=3)


# ----------------------------------------------------------------------------- mixtures


def test_mixture_is_weighted_deterministic_and_resumable(gdata, folder):
  cfg = glyph_cfg(gdata)
  cfg.tokenizer.cache_dir = os.path.join(folder, "tok")
  cfg.mixture = (
      {"name": "glyphs", "weight": 3.0},
      {"name": "user_image_folder/animals", "data_dir": folder, "weight": 1.0, "text_key": None,
       "domain_key": "domain", "augment": {"affine": False}},
  )
  tok = vocab.get_tokenizer(cfg)
  it = pipeline.make_train_iterator(cfg, global_batch=16, seed=0, process_index=0, process_count=1)
  batches = take(it, 4)
  texts = [t for b in batches for t in tok.decode(b["tokens"])]
  assert sum(t in ("zebra", "yak", "ibis") for t in texts) == 16  # exactly 1 in 4
  state = it.get_state()
  expected = take(it, 2)
  again = pipeline.make_train_iterator(cfg, global_batch=16, seed=0, process_index=0, process_count=1)
  assert_same(take(again, 4), batches)
  again.set_state(state)
  assert_same(take(again, 2), expected)


# ----------------------------------------------------------------------------- users' data


def test_undecodable_image_is_skipped_and_counted(tmp_path):
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  root = write_image_folder(str(tmp_path / "imgs"), per_class=3, corrupt=1)
  image_text.prepare_image_folder(root, "bad", data_dir=str(tmp_path / "data"))
  cfg = folder_cfg(str(tmp_path / "data"))
  cfg.name = "user_image_folder/bad"
  it = pipeline.make_train_iterator(cfg, global_batch=2, seed=0, process_index=0, process_count=1)
  batches = take(it, 10)  # 10 epochs of 9 good + 1 bad image
  assert all(b["image"].shape == (2, 8, 8, 1) for b in batches)
  assert it.num_skipped >= 1 and it.get_state()["num_skipped"] == it.num_skipped
  a = arrays.load_split_arrays(cfg, "train")
  assert a["num_skipped"] == 1 and len(a["label"]) == 9


def test_image_folder_with_domains(tmp_path):
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  root = write_image_folder(str(tmp_path / "imgs"), per_class=2, domains=["photo", "sketch"])
  image_text.prepare_image_folder(root, "dg", data_dir=str(tmp_path / "data"))
  cfg = folder_cfg(str(tmp_path / "data"), domain_key="domain")
  cfg.name = "user_image_folder/dg"
  a = arrays.load_split_arrays(cfg, "train")
  assert a["class_names"] == ["ibis", "yak", "zebra"]
  assert sorted(set(a["domain_name"])) == ["photo", "sketch"] and len(a["label"]) == 12
  assert [a["class_names"][i] for i in a["label"]] == a["text"]


def test_image_captions_manifest(tmp_path):
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  write_image_folder(str(tmp_path / "imgs"), classes=("yak",), per_class=2)
  (tmp_path / "m.tsv").write_text(
      "image\tcaption\nimgs/yak/0.png\ta yak in the snow\nimgs/yak/0.png\ta hairy animal\n"
      "imgs/yak/1.png\ta sketch of a yak\nimgs/missing.png\tgone\n")
  image_text.prepare_image_captions(str(tmp_path / "m.tsv"), "caps", data_dir=str(tmp_path / "data"))
  cfg = folder_cfg(str(tmp_path / "data"), text_key="captions", label_key=None)
  cfg.name = "user_image_captions/caps"
  it = pipeline.make_train_iterator(cfg, global_batch=2, seed=0, process_index=0, process_count=1)
  tok = vocab.get_tokenizer(cfg)
  seen = {t for b in take(it, 6) for t in tok.decode(b["tokens"])}
  assert seen <= {"a yak in the snow", "a hairy animal", "a sketch of a yak"} and len(seen) >= 2
  a = arrays.load_split_arrays(cfg, "train")
  assert sorted(a["text"]) == ["a sketch of a yak", "a yak in the snow"] and a["class_names"] is None


def test_users_data_errors(tmp_path):
  with pytest.raises(image_text.UserDataError, match="does not exist"):
    image_text.prepare_image_folder(str(tmp_path / "nope"), "x", data_dir=str(tmp_path))
  with pytest.raises(image_text.UserDataError, match="invalid"):
    image_text.prepare_image_folder(str(tmp_path), "bad name", data_dir=str(tmp_path))
  cfg = folder_cfg(str(tmp_path))
  cfg.name = "user_image_folder/never"
  with pytest.raises(data_errors.DataNotPreparedError, match="fszjax prepare folder ROOT --name never"):
    arrays.load_split_arrays(cfg, "train")


# ----------------------------------------------------------------------------- catalog (mocked)


@pytest.mark.parametrize("name,split,kw", [
    ("imagenet2012", "train", {}),
    ("cifar100", "train", {}),
    ("omniglot", "train", {}),
    # The mock cannot encode coco's `objects` sequences, so TFDS decodes images here.
    ("coco_captions", "train", {"text_key": "captions/text", "label_key": None, "image_decoder": "tfds"}),
])
def test_catalog_datasets_through_the_pipeline(name, split, kw, tmp_path):
  import tensorflow_datasets as tfds

  cfg = defaults.tfds_data_config(name, image_size=16)
  cfg.tokenizer.vocab_size = 40
  cfg.tokenizer.cache_dir = str(tmp_path)
  cfg.num_threads = 1
  for k, v in kw.items():
    cfg[k] = v
  with tfds.testing.mock_data(num_examples=8):
    it = pipeline.make_train_iterator(cfg, global_batch=4, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["tokens"].shape == (4, 32) and b["label"].shape == (4,)
    a = arrays.load_split_arrays(cfg, split, max_examples=4)
    assert a["image"].shape == (4, 16, 16, 3) and len(a["text"]) == 4
    if kw.get("label_key", "label"):
      assert a["class_names"] and (a["label"] < len(a["class_names"])).all()


def test_worker_processes_give_the_same_batches_and_resume(gdata):
  cfg = glyph_cfg(gdata)
  threads = take(pipeline.make_train_iterator(cfg, global_batch=8, seed=5, process_index=0, process_count=1), 3)
  cfg.num_workers = 1
  it = pipeline.make_train_iterator(cfg, global_batch=8, seed=5, process_index=0, process_count=1)
  try:
    assert_same(take(it, 1), threads[:1])
    state = it.get_state()
    assert_same(take(it, 2), threads[1:])
  finally:
    it.close()
  again = pipeline.make_train_iterator(cfg, global_batch=8, seed=5, process_index=0, process_count=1)
  try:
    again.set_state(state)
    assert_same(take(again, 2), threads[1:])
  finally:
    again.close()


def test_stroke_jitter_dilates_erodes_and_keeps_the_rest():
  x = np.full((400, 8, 8, 1), -1.0, np.float32)
  x[:, 2:5, 3:5] = 1.0  # a 3x2 bright stroke on a dark background (normalised pixels)
  y = stroke_jitter(x, np.random.default_rng(0), 0.5)
  ink = (y > 0).sum((1, 2, 3))
  # 2x2 max filter: the stroke grows by one row and one column; min filter: shrinks by one.
  assert set(np.unique(ink)) == {2, 6, 12}
  frac = {n: float(np.mean(ink == n)) for n in (2, 6, 12)}
  assert abs(frac[6] - 0.5) < 0.08 and abs(frac[12] - 0.25) < 0.08 and abs(frac[2] - 0.25) < 0.08
  np.testing.assert_array_equal(y[ink == 6], x[ink == 6])
  assert y.dtype == x.dtype and y.shape == x.shape
  # p = 0 is the identity; p outside [0, 1] names the key.
  np.testing.assert_array_equal(stroke_jitter(x, np.random.default_rng(0), 0.0), x)


def test_stroke_augmentation_changes_training_images_only():
  base = defaults.glyphs_data_config().to_dict()
  base["augment"]["affine"] = False
  on = dict(base, augment=dict(base["augment"], stroke=1.0))
  img = np.zeros((16, 16), np.uint8)
  img[5:9, 6:9] = 255  # 4 x 3 ink pixels
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="PNG")
  value = buf.getvalue()
  kw = dict(class_names=["a"], tokenizer=None)
  # A bad probability is one line naming the key, when the processor is built.
  bad = dict(base, augment=dict(base["augment"], stroke=1.5))
  with pytest.raises(data_errors.DataError, match=r"data.augment.stroke=1.5 must be a probability"):
    ExampleProcessor(bad, train=True, **kw)
  ExampleProcessor(bad, train=False, **kw)  # evaluation does not augment
  plain = ExampleProcessor(dict(base, image_size=16), train=True, **kw).image(
      value, np.random.default_rng(0))
  jit = ExampleProcessor(dict(on, image_size=16), train=True, **kw).image(
      value, np.random.default_rng(0))
  ev = ExampleProcessor(dict(on, image_size=16), train=False, **kw).image(value, None)
  np.testing.assert_array_equal(ev, plain)
  # stroke=1: always dilated (5 x 4) or eroded (3 x 2); evaluation is never jittered.
  assert (plain > 0).sum() == 12 and (jit > 0).sum() in (20, 6)
