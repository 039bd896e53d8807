"""Self-contained workdirs: a finished run copied elsewhere, its dataset deleted, used from
another directory (`fszjax.load`, `fszjax eval`, `fszjax adapt --config.init_from`), and
`fszjax adapt` from a converted open_clip model on a mock TFDS dataset."""

import json
import os
import shutil

import numpy as np
import pytest

import data_testlib
import fszjax
from fszjax import cli, config as config_lib, pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = data_testlib.tiny_run_overrides(total_steps=3, max_examples=32)
ADAPT_SMALL = [
    "--config.fewshot.splits=['test_classes']", "--config.fewshot.settings=['5way1shot']",
    "--config.fewshot.episodes=10", "--config.fewshot.q_query=2",
    "--config.fewshot.meta.enabled=False", "--config.fewshot.dg.enabled=False",
    "--config.fewshot.probe_steps=2"]


@pytest.fixture(scope="module")
def moved(gdir, tmp_path_factory):
  """A run trained with relative paths from directory A on its own copy of the data, then
  copied to B, the original run and the data deleted; tests run from directory C."""
  a = tmp_path_factory.mktemp("run_from_here")
  shutil.copytree(gdir, a / "data")
  cwd = os.getcwd()
  os.chdir(a)
  try:
    cfg = config_lib.load_config(os.path.join(ROOT, "configs/glyphs.py"),
                                 ["--config.data.data_dir=data"] + TINY_RUN)
    pretrain.train(cfg, "run")
    original = fszjax.load("run")
    ref = {"tokens": original.tokenize(["latin small letter a", "digit seven"]),
           "text": original.encode_text(["latin small letter a"]),
           "image": original.encode_image(np.zeros((2, 32, 32, 1), np.uint8))}
  finally:
    os.chdir(cwd)
  copy = tmp_path_factory.mktemp("elsewhere") / "copy"
  shutil.copytree(a / "run", copy)
  shutil.rmtree(a)  # the dataset (and its tokenizer cache) and the original run are gone
  return str(copy), ref


def test_config_json_points_into_the_workdir(moved):
  copy, _ = moved
  saved = json.load(open(os.path.join(copy, "config.json")))
  tok = saved["data"]["tokenizer"]["path"]
  assert not os.path.isabs(tok) and tok.startswith("tokenizer/")
  assert os.path.isfile(os.path.join(copy, tok))
  assert os.path.isabs(saved["data"]["data_dir"])  # where the dataset was, not "data"
  loaded = config_lib.load_config(os.path.join(copy, "config.json"))
  assert loaded.data.tokenizer.path == os.path.join(copy, tok)


def test_load_from_another_directory_without_the_dataset(moved, tmp_path, monkeypatch):
  copy, ref = moved
  monkeypatch.chdir(tmp_path)
  for path in (copy, os.path.join(copy, "checkpoints"), os.path.join(copy, "checkpoints", "3")):
    model = fszjax.load(path)
    np.testing.assert_array_equal(model.tokenize(["latin small letter a", "digit seven"]),
                                  ref["tokens"])
    np.testing.assert_allclose(model.encode_text(["latin small letter a"]), ref["text"],
                               atol=1e-6)
    np.testing.assert_allclose(model.encode_image(np.zeros((2, 32, 32, 1), np.uint8)),
                               ref["image"], atol=1e-6)


def test_eval_and_adapt_name_the_data_flag_then_work(moved, gdir, tmp_path, monkeypatch, capsys):
  copy, _ = moved
  monkeypatch.chdir(tmp_path)
  assert cli.main(["eval", "--workdir", copy, "--config.eval.max_examples=16"]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("fszjax: error:")]
  assert len(err) == 1 and "is not prepared" in err[0] and "--config.data.data_dir=" in err[0]
  assert cli.main(["eval", "--workdir", copy, "--config.eval.max_examples=16",
                   f"--config.data.data_dir={gdir}"]) == 0
  res = json.load(open(os.path.join(copy, "eval.json")))
  assert res["steps"] == 3 and 0.0 <= res["zeroshot"]["test_classes"]["top1"] <= 1.0

  adapt = ["adapt", "--config", os.path.join(ROOT, "configs/glyphs_fewshot.py"),
           "--workdir", "adapt", f"--config.init_from={copy}"] + ADAPT_SMALL
  assert cli.main(adapt) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("fszjax: error:")]
  assert len(err) == 1 and "is not prepared" in err[0] and "--config.data.data_dir=" in err[0]
  assert cli.main(adapt + [f"--config.data.data_dir={gdir}"]) == 0
  res = json.load(open(tmp_path / "adapt" / "results.json"))
  assert res["methods"]["zeroshot"]["test_classes"]["5way1shot"]["episodes"] == 10
  saved = json.load(open(tmp_path / "adapt" / "config.json"))
  assert saved["init_from"] == copy and saved["data"]["data_dir"] == gdir


def test_missing_tokenizer_file_names_the_fix(moved, tmp_path):
  copy, _ = moved
  broken = tmp_path / "broken"
  shutil.copytree(copy, broken)
  shutil.rmtree(broken / "tokenizer")
  model = fszjax.load(str(broken))
  with pytest.raises(fszjax.inference.LoadError, match="copy the whole workdir"):
    model.tokenize(["a"])


def test_eval_data_config_keeps_the_model_side():
  from fszjax.data import defaults
  from fszjax.fewshot import eval_data

  model = defaults.tfds_data_config("imagenet2012", image_size=64)
  model.tokenizer.path = "/m/tokenizer/bpe.txt.gz"
  over = eval_data.data_overrides()
  assert eval_data.eval_data_config(model, over).name == "imagenet2012"
  over.name, over.label_key = "glyphs", "label"
  d = eval_data.eval_data_config(model, over)
  assert d.name == "glyphs" and d.text_key == "text" and d.domain_key == "font"
  assert d.glyphs.image_size == 32 and d.image_size == 64 and d.channels == 3
  assert d.tokenizer.path == "/m/tokenizer/bpe.txt.gz"
  over.name = "cifar10"
  d = eval_data.eval_data_config(model, over)
  assert d.text_key is None and d.label_key == "label" and d.data_dir is None


def test_adapt_from_converted_open_clip_on_mock_tfds(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch")
  open_clip = pytest.importorskip("open_clip")
  tfds = pytest.importorskip("tensorflow_datasets")
  from safetensors.torch import save_file

  tiny = dict(embed_dim=16, vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16,
                                            patch_size=8),
              text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
  torch.manual_seed(0)
  tm = open_clip.CLIP(**tiny).eval()
  save_file(tm.state_dict(), str(tmp_path / "w.safetensors"))
  (tmp_path / "tiny.json").write_text(json.dumps(tiny))
  assert cli.main(["convert", "open_clip", "--model_config", str(tmp_path / "tiny.json"),
                   "--weights", str(tmp_path / "w.safetensors"), "--out",
                   str(tmp_path / "oc")]) == 0
  monkeypatch.chdir(tmp_path)
  with tfds.testing.mock_data(num_examples=80):
    rc = cli.main(["adapt", "--config", os.path.join(ROOT, "configs/glyphs_fewshot.py"),
                   "--workdir", "a", "--config.init_from=oc", "--config.data.name=cifar10",
                   "--config.fewshot.splits=['test']", "--config.fewshot.settings=['5way1shot']",
                   "--config.fewshot.episodes=12", "--config.fewshot.q_query=1",
                   "--config.fewshot.meta.enabled=False", "--config.fewshot.dg.enabled=False",
                   "--config.fewshot.probe_steps=2"])
  assert rc == 0
  res = json.load(open(tmp_path / "a" / "results.json"))
  for m in ("zeroshot", "protonet", "zs_head_adapt", "wise_ft"):
    r = res["methods"][m]["test"]["5way1shot"]
    assert r["episodes"] == 12 and 0.0 <= r["mean"] <= 1.0
  zs = res["zeroshot_top1"]["test"]
  assert zs["num_classes"] <= 10 and zs["num_examples"] == 80  # cifar10's classes, mock images
