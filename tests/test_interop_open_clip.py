"""open_clip interop against the real open_clip package (PyTorch, CPU): parity of embeddings
and logits for converted models, export -> open_clip -> import round trips, bad input."""

import json
import os

import chex
import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
from safetensors.torch import save_file  # noqa: E402

import fszjax  # noqa: E402
from fszjax import checkpoint as ckpt_lib  # noqa: E402
from fszjax import cli, inference, pretrain, sharding  # noqa: E402
from fszjax.convert import common, open_clip as oc  # noqa: E402

TINY = dict(embed_dim=32,
            vision_cfg=dict(image_size=32, layers=2, width=64, head_width=16, patch_size=8),
            text_cfg=dict(context_length=16, vocab_size=49408, width=48, heads=4, layers=2))


def _torch_model(cfg, seed=0):
  torch.manual_seed(seed)
  m = open_clip.CLIP(**cfg).eval()
  with torch.no_grad():  # visible weights everywhere (open_clip zero-inits some biases)
    for p in m.parameters():
      p.add_(0.02 * torch.randn_like(p))
  return m


def _reference(m, images_nchw, tokens):
  with torch.no_grad():
    zi = m.encode_image(torch.from_numpy(images_nchw), normalize=True).numpy()
    zt = m.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
    logits = (m.logit_scale.exp() * torch.from_numpy(zi) @ torch.from_numpy(zt).T).numpy()
    if m.logit_bias is not None:
      logits = logits + m.logit_bias.item()
  return zi, zt, logits


def _assert_parity(model: inference.Model, tm, images_nchw, tokens):
  zi, zt, logits = _reference(tm, images_nchw, tokens)
  ji = model.encode_image(images_nchw.transpose(0, 2, 3, 1))
  jt = model.encode_text(tokens)
  np.testing.assert_allclose(ji, zi, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jt, zt, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model.logits(images_nchw.transpose(0, 2, 3, 1), tokens), logits,
                             rtol=1e-4, atol=1e-4)


def _images(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A tiny open_clip model saved as safetensors and converted through the CLI."""
  d = tmp_path_factory.mktemp("oc_tiny")
  tm = _torch_model(TINY)
  save_file(tm.state_dict(), str(d / "w.safetensors"))
  (d / "tiny.json").write_text(json.dumps(TINY))
  rc = cli.main(["convert", "open_clip", "--model_config", str(d / "tiny.json"),
                 "--weights", str(d / "w.safetensors"), "--out", str(d / "out")])
  assert rc == 0
  return tm, str(d / "out"), d


def test_tiny_parity_through_cli_and_load(tiny):
  tm, out, _ = tiny
  assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "tokenizer"]
  model = fszjax.load(out)
  tokens = model.tokenize(["a photo of a cat.", "A DOG running on the beach, at night!"])
  ref_tok = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat.",
                                                 "A DOG running on the beach, at night!"], 16)
  np.testing.assert_array_equal(tokens, ref_tok.numpy())
  _assert_parity(model, tm, _images(2, 32), tokens)
  # Zero-shot works end to end with the CLIP BPE tokenizer.
  clf = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])
  assert clf.shape == (2, 32)
  np.testing.assert_allclose(np.linalg.norm(clf, axis=1), 1.0, rtol=1e-5)
  probs = model.classify(_images(3, 32).transpose(0, 2, 3, 1), clf)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_preprocess_matches_open_clip_transform(tiny):
  from PIL import Image

  model = fszjax.load(tiny[1])
  tf = open_clip.image_transform(32, is_train=False)  # open_clip's eval preprocessing
  rng = np.random.default_rng(0)
  imgs = [Image.fromarray(rng.integers(0, 256, size=s).astype(np.uint8))
          for s in [(50, 40, 3), (40, 71, 3), (32, 32, 3)]]
  ref = np.stack([tf(im).numpy().transpose(1, 2, 0) for im in imgs])
  np.testing.assert_allclose(model.preprocess(imgs), ref, atol=1e-5)
  # Raw images are preprocessed on the way in.
  np.testing.assert_allclose(model.encode_image(imgs), model.encode_image(ref), atol=1e-5)


def test_converted_dir_restores_like_eval_and_init_from(tiny):
  _, out, _ = tiny
  cfg, _ = inference.load_config(out)
  assert cfg.data.tokenizer.kind == "clip_bpe" and cfg.data.max_text_len == 16
  mesh = sharding.make_mesh(-1, 1, 1)
  abstract = pretrain.abstract_train_state(cfg, mesh, sharding.rules_from_config(cfg))
  ckpt = ckpt_lib.Checkpointer(os.path.join(out, "checkpoints"), read_only=True)
  step, state = ckpt.restore(abstract)
  assert step == 0
  flat = common.flatten(ckpt_lib.load_params_numpy(out))
  restored = common.flatten(jax_tree_to_numpy(state.params))
  assert set(flat) == set(restored)
  chex.assert_trees_all_equal(flat, restored)
  # config.init_from=<converted dir> copies every param.
  init, n = pretrain.init_params_from(state, out)
  assert n == len(flat)
  np.testing.assert_array_equal(np.asarray(init.params["img"]["cls"]), flat["img/cls"])


def jax_tree_to_numpy(tree):
  import jax

  return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize("quick_gelu", [True])
def test_tiny_quickgelu_parity_torch_file(tmp_path, quick_gelu):
  cfg = dict(TINY, quick_gelu=quick_gelu)
  tm = _torch_model(cfg, seed=1)
  torch.save(tm.state_dict(), str(tmp_path / "w.pt"))
  out = oc.convert(cfg, str(tmp_path / "w.pt"), str(tmp_path / "out"), scan_layers=True)
  model = fszjax.load(out)
  assert model.config.model.image.act == "quick_gelu" and model.config.model.scan_layers
  assert "blocks" in model.params["img"]["encoder"]  # the scanned layout
  tokens = model.tokenize(["itap of a cat", "a origami dog"])
  _assert_parity(model, tm, _images(2, 32, seed=1), tokens)


def test_vit_b32_parity():
  """open_clip's ViT-B-32 (random init, fixed seed) against the converted params, batch 2."""
  torch.manual_seed(0)
  tm = open_clip.create_model("ViT-B-32", pretrained=None).eval()
  name, oc_cfg = oc.model_config("ViT-B-32")
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  cfg = oc.fszjax_config(oc_cfg, name, bpe_path="")
  flat = common.fit_to_model(oc.import_state_dict(sd, oc_cfg, name), cfg, name)
  from fszjax.text import clip_bpe

  model = inference.Model(cfg, common.unflatten(flat), tokenizer=clip_bpe.ClipBpeTokenizer.from_file())
  tokens = model.tokenize(["a diagram", "a photo of a dog"])
  _assert_parity(model, tm, _images(2, 224), tokens)


def _clip_style_fszjax_config():
  """A fszjax CLIP-style config exercising the export options (eps, tanh GELU, bias, ...)."""
  cfg = oc.fszjax_config(TINY, "tiny", bpe_path="")
  cfg.model.image.ln_eps = cfg.model.text.ln_eps = 1e-6
  cfg.model.image.act = cfg.model.text.act = "gelu_tanh"
  cfg.model.image.ln_pre = False
  cfg.model.text.causal = False
  cfg.model.text.pool = "last"
  cfg.model.text.proj_bias = True
  cfg.model.logit_bias = True
  cfg.model.scan_layers = True
  return cfg


def test_export_loads_in_open_clip_and_reimports_bitwise(tmp_path):
  import jax
  import jax.numpy as jnp
  from flax import linen as nn

  from fszjax.models.two_tower import build_model

  cfg = _clip_style_fszjax_config()
  module = build_model(cfg.model)
  params = nn.unbox(module.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)),
                                jnp.zeros((1, 16), jnp.int32))["params"])
  flat = {k: np.asarray(v) for k, v in common.flatten(params).items()}
  work = common.save_converted(str(tmp_path / "work"), cfg, flat)

  res = oc.export_workdir(work, str(tmp_path / "export" / "model.safetensors"))
  assert res["builtin"] is None and res["model_cfg"]["text_cfg"]["no_causal_mask"]
  tm = open_clip.create_model("local-dir:" + str(tmp_path / "export")).eval()
  model = fszjax.load(work, tokenizer=open_clip_bpe())
  tokens = np.random.default_rng(0).integers(1, 49000, size=(3, 16)).astype(np.int32)
  _assert_parity(model, tm, _images(3, 32, seed=2), tokens)

  back = oc.convert(res["config"], res["weights"], str(tmp_path / "back"))
  again = common.flatten(ckpt_lib.load_params_numpy(back))
  orig = common.unstack_blocks(flat)  # the import writes the unscanned layout
  assert set(again) == set(orig)
  chex.assert_trees_all_equal(again, orig, strict=True)  # strict: dtypes and shapes equal too
  # Exporting the re-imported directory gives the same tensors, bit for bit.
  res2 = oc.export_workdir(back, str(tmp_path / "export2"))
  a, b = common.read_safetensors(res["weights"]), common.read_safetensors(res2["weights"])
  assert list(a) == list(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


def open_clip_bpe():
  from fszjax.text import clip_bpe

  return clip_bpe.find_bpe_file()


def test_wrong_architecture_names_first_mismatching_tensor(tiny, capsys):
  _, _, d = tiny
  with pytest.raises(common.ConvertError) as e:
    oc.convert("ViT-B-32", str(d / "w.safetensors"), str(d / "wrong"))
  msg = str(e.value)
  assert "\n" not in msg and "ViT-B-32" in msg and "--model" in msg
  key, got, want = _parse_mismatch(msg)
  sd = common.read_safetensors(str(d / "w.safetensors"))
  assert tuple(sd[key].shape) == got
  assert oc.state_dict_shapes(oc.model_config("ViT-B-32")[1])[key] == want
  first_bad = next(k for k, v in sd.items()
                   if oc.state_dict_shapes(oc.model_config("ViT-B-32")[1]).get(k) != tuple(v.shape))
  assert key == first_bad
  assert not os.path.exists(d / "wrong")
  # The CLI prints it as one line and exits 2.
  rc = cli.main(["convert", "open_clip", "--model", "ViT-B-32", "--weights",
                 str(d / "w.safetensors"), "--out", str(d / "wrong")])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and err[0].startswith("fszjax: error: weights do not match")


def _parse_mismatch(msg):
  import re

  m = re.search(r": (\S+) has shape \(([\d, ]*)\) but \S+ expects \(([\d, ]*)\)", msg)
  assert m, msg
  shape = lambda s: tuple(int(x) for x in s.replace(" ", "").split(",") if x)  # noqa: E731
  return m.group(1), shape(m.group(2)), shape(m.group(3))


class _Evil:
  """A pickled object whose unpickling would run code (create a marker file)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (_touch, (self.marker,))


def _touch(path):
  with open(path, "w") as f:
    f.write("pwned")


def test_pickle_needing_code_is_refused(tmp_path):
  marker = str(tmp_path / "marker")
  torch.save({"visual.proj": torch.zeros(2, 2), "evil": _Evil(marker)}, str(tmp_path / "evil.pt"))
  with pytest.raises(common.ConvertError, match="refusing to unpickle .*arbitrary code.*safetensors"):
    oc.convert(TINY, str(tmp_path / "evil.pt"), str(tmp_path / "out"))
  assert not os.path.exists(marker) and not os.path.exists(tmp_path / "out")


def test_existing_output_is_kept(tiny):
  _, out, d = tiny
  before = sorted(os.listdir(out))
  with pytest.raises(common.ConvertError, match="already exists.*--overwrite"):
    oc.convert(str(d / "tiny.json"), str(d / "w.safetensors"), out)
  assert sorted(os.listdir(out)) == before


def test_unsupported_open_clip_options_are_named():
  with pytest.raises(common.ConvertError, match="attentional_pool"):
    oc.fszjax_model_config(dict(TINY, vision_cfg=dict(TINY["vision_cfg"], attentional_pool=True)))
  with pytest.raises(common.ConvertError, match="unknown open_clip model 'ViT-X-1'"):
    oc.model_config("ViT-X-1")
  name, cfg = oc.model_config("ViT-L-14-quickgelu")
  assert cfg["quick_gelu"] and oc.builtin_name(oc.open_clip_model_config(
      oc.fszjax_model_config(cfg, name))) == "ViT-L-14-quickgelu"


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation
def test_bf16_safetensors_and_torchscript(tmp_path):
  tm = _torch_model(TINY, seed=2)
  sd16 = {k: v.to(torch.bfloat16) for k, v in tm.state_dict().items()}
  save_file(sd16, str(tmp_path / "w16.safetensors"))
  got = common.read_weights(str(tmp_path / "w16.safetensors"))
  for k, v in sd16.items():
    np.testing.assert_array_equal(got[k].astype(np.float32), v.float().numpy())
  flat = oc.import_state_dict(got, TINY)
  cfg = oc.fszjax_config(TINY, "tiny", bpe_path="")
  assert common.fit_to_model(flat, cfg, "tiny")["img/cls"].dtype == np.float32
  torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "ts.pt"))
  with pytest.raises(common.ConvertError, match="TorchScript archive"):
    common.read_weights(str(tmp_path / "ts.pt"))
