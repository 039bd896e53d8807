"""big_vision (SigLIP) import: a random big_vision-layout .npz loaded by open_clip's own
`load_big_vision_weights` and by `fszjax convert big_vision` gives the same embeddings."""

import io
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")
from open_clip.convert import load_big_vision_weights  # noqa: E402

import fszjax  # noqa: E402
from fszjax import cli  # noqa: E402
from fszjax.convert import big_vision as bv  # noqa: E402
from fszjax import text as tokenizers  # noqa: E402
from fszjax.convert import common  # noqa: E402

# A SigLIP-shaped model, small: image 32px, patch 8, width 64, 2 blocks, 4 heads, MAP head,
# no image head (embedding = width, as SigLIP); text width 48, 2 blocks, 4 heads, vocab 100,
# length 12, projection with bias to 64.
IMG = dict(size=32, patch=8, width=64, depth=2, heads=4, mlp=256)
TXT = dict(vocab=100, length=12, width=48, depth=2, heads=4, mlp=192, embed=64)
TIMM_NAME = "vit_fszjax_test_siglip"


def _register_timm_model():
  from timm.models import register_model
  from timm.models.vision_transformer import vit_base_patch16_siglip_224

  if TIMM_NAME in timm.list_models():
    return

  def vit_fszjax_test_siglip(pretrained=False, **kw):
    small = dict(img_size=IMG["size"], patch_size=IMG["patch"], embed_dim=IMG["width"],
                 depth=IMG["depth"], num_heads=IMG["heads"])
    return vit_base_patch16_siglip_224(pretrained=False, **dict(small, **kw))

  vit_fszjax_test_siglip.__module__ = "timm.models.vision_transformer"
  register_model(vit_fszjax_test_siglip)


def _open_clip_siglip():
  _register_timm_model()
  model = open_clip.CustomTextCLIP(
      embed_dim=TXT["embed"], init_logit_bias=-10.0,
      vision_cfg=dict(image_size=IMG["size"], timm_model_name=TIMM_NAME, timm_pool="map",
                      timm_proj="none"),
      text_cfg=dict(context_length=TXT["length"], vocab_size=TXT["vocab"], width=TXT["width"],
                    heads=TXT["heads"], layers=TXT["depth"], no_causal_mask=True, proj_bias=True,
                    pool_type="last", norm_kwargs={"eps": 1e-6}))
  # big_vision's MLPs use flax's nn.gelu, the tanh approximation; open_clip/timm use the
  # exact GELU. Align open_clip with the source (fszjax converts with act=gelu_tanh).
  for mod in model.modules():
    if isinstance(mod, torch.nn.GELU):
      mod.approximate = "tanh"
  return model.eval()


def _encoder(rng, prefix, d, heads, mlp, depth, scanned):
  dh = d // heads
  block = {
      "LayerNorm_0/scale": 1 + 0.1 * rng.normal(size=(d,)),
      "LayerNorm_0/bias": 0.1 * rng.normal(size=(d,)),
      "LayerNorm_1/scale": 1 + 0.1 * rng.normal(size=(d,)),
      "LayerNorm_1/bias": 0.1 * rng.normal(size=(d,)),
      "MlpBlock_0/Dense_0/kernel": (d, mlp), "MlpBlock_0/Dense_0/bias": (mlp,),
      "MlpBlock_0/Dense_1/kernel": (mlp, d), "MlpBlock_0/Dense_1/bias": (d,),
  }
  for n in ("query", "key", "value"):
    block[f"MultiHeadDotProductAttention_0/{n}/kernel"] = (d, heads, dh)
    block[f"MultiHeadDotProductAttention_0/{n}/bias"] = (heads, dh)
  block["MultiHeadDotProductAttention_0/out/kernel"] = (heads, dh, d)
  block["MultiHeadDotProductAttention_0/out/bias"] = (d,)
  out = {}
  layers = [{k: (0.15 * rng.normal(size=v) if isinstance(v, tuple) else
                 v + 0.05 * rng.normal(size=v.shape)) for k, v in block.items()} for _ in range(depth)]
  for k in block:
    if scanned:
      out[f"{prefix}encoderblock/{k}"] = np.stack([lay[k] for lay in layers])
    else:
      for i, lay in enumerate(layers):
        out[f"{prefix}encoderblock_{i}/{k}"] = lay[k]
  out[f"{prefix}encoder_norm/scale"] = 1 + 0.1 * rng.normal(size=(d,))
  out[f"{prefix}encoder_norm/bias"] = 0.1 * rng.normal(size=(d,))
  return out


def _siglip_npz(path, seed=0, scanned_text=True):
  """Random params in big_vision's SigLIP layout, saved like its checkpoints (params/...)."""
  rng = np.random.default_rng(seed)
  d, p, t = IMG["width"], IMG["patch"], TXT["width"]
  w = {
      "img/embedding/kernel": 0.1 * rng.normal(size=(p, p, 3, d)),
      "img/embedding/bias": 0.1 * rng.normal(size=(d,)),
      "img/pos_embedding": 0.5 * rng.normal(size=(1, (IMG["size"] // p) ** 2, d)),
      "img/MAPHead_0/probe": rng.normal(size=(1, 1, d)),
      "txt/Embed_0/embedding": rng.normal(size=(TXT["vocab"], t)),
      "txt/pos_embedding": 0.5 * rng.normal(size=(1, TXT["length"], t)),
      "txt/head/kernel": 0.2 * rng.normal(size=(t, TXT["embed"])),
      "txt/head/bias": 0.1 * rng.normal(size=(TXT["embed"],)),
      "t": np.asarray([np.log(10.0) + 0.3]), "b": np.asarray([-10.0 + 0.5]),
  }
  w.update(_encoder(rng, "img/Transformer/", d, IMG["heads"], IMG["mlp"], IMG["depth"], False))
  w.update(_encoder(rng, "txt/Encoder_0/", t, TXT["heads"], TXT["mlp"], TXT["depth"], scanned_text))
  mapb = _encoder(rng, "X/", d, IMG["heads"], IMG["mlp"], 1, False)
  for k, v in mapb.items():
    if k.startswith("X/encoderblock_0/") and "LayerNorm_1" not in k:
      w["img/MAPHead_0/" + k[len("X/encoderblock_0/"):]] = v
  np.savez(path, **{"params/" + k: np.asarray(v, np.float32) for k, v in w.items()})
  return path


def _sentencepiece_model(path):
  """A tiny T5-style SentencePiece model (pad 0, EOS 1, UNK 2) as SigLIP's c4_en."""
  import sentencepiece as spm

  texts = ["a photo of a cat", "a photo of a dog", "the big red car", "an image of a bird",
           "small green frog on a leaf", "a drawing of the tower"] * 20
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=buf, vocab_size=48, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, hard_vocab_limit=False,
      minloglevel=2, num_threads=1)
  with open(path, "wb") as f:
    f.write(buf.getvalue())
  return path


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  d = tmp_path_factory.mktemp("bv")
  npz = _siglip_npz(str(d / "siglip.npz"))
  spm_path = _sentencepiece_model(str(d / "c4_en_tiny.model"))
  rc = cli.main(["convert", "big_vision", "--weights", npz, "--tokenizer", spm_path,
                 "--out", str(d / "out")])
  assert rc == 0
  return npz, spm_path, str(d / "out")


def test_open_clip_loader_and_fszjax_agree(siglip):
  npz, _, out = siglip
  tm = _open_clip_siglip()
  load_big_vision_weights(tm, npz)
  model = fszjax.load(out)
  cfg = model.config.model
  assert (cfg.image.width, cfg.image.depth, cfg.image.num_heads, cfg.image.patch_size,
          cfg.image.image_size, cfg.image.pool, cfg.image.proj) == (64, 2, 4, 8, 32, "map", False)
  assert (cfg.text.vocab_size, cfg.text.max_len, cfg.text.num_heads, cfg.text.depth,
          cfg.text.pool, cfg.text.causal, cfg.embed_dim) == (100, 12, 4, 2, "last", False, 64)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  tokens = rng.integers(0, TXT["vocab"], size=(3, TXT["length"])).astype(np.int32)
  with torch.no_grad():
    zi = tm.encode_image(torch.from_numpy(images), normalize=True).numpy()
    zt = tm.encode_text(torch.from_numpy(tokens).long(), normalize=True).numpy()
    li, _ = tm.get_logits(torch.from_numpy(images), torch.from_numpy(tokens).long())
  np.testing.assert_allclose(model.encode_image(images.transpose(0, 2, 3, 1)), zi, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model.encode_text(tokens), zt, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model.logits(images.transpose(0, 2, 3, 1), tokens), li.numpy(),
                             rtol=1e-4, atol=1e-4)
  assert model.logit_bias == pytest.approx(-9.5)


def test_siglip_tokenizer_semantics(siglip):
  _, spm_path, out = siglip
  model = fszjax.load(out)
  tok = model.tokenizer
  assert isinstance(tok, tokenizers.BigVisionTokenizer) and tok.eot_id == 1 and tok.pad_id == 1
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=spm_path)
  ids = sp.encode("a photo of a cat")
  got = model.tokenize(["A photo of a CAT!"])[0]  # canonicalised: lower case, no punctuation
  np.testing.assert_array_equal(got, ids + [1] + [1] * (12 - len(ids) - 1))
  long = model.tokenize(["a photo of a cat " * 10])[0]  # sticky EOS when truncated
  assert long[-1] == 1 and len(long) == 12
  np.testing.assert_array_equal(long[:-1], sp.encode(("a photo of a cat " * 10).strip())[:11])
  clf = model.zero_shot_classifier(["cat", "dog"], ["a photo of a {}."])
  assert clf.shape == (2, 64)
  # A .model passed to fszjax.load is used the big_vision way too.
  other = fszjax.load(out, tokenizer=spm_path).tokenizer
  assert isinstance(other, tokenizers.BigVisionTokenizer) and other.pad_id == 1


def test_big_vision_bad_input(tmp_path):
  np.savez(str(tmp_path / "x.npz"), **{"params/foo/bar": np.zeros(3)})
  with pytest.raises(common.ConvertError, match="not a big_vision two-tower checkpoint"):
    bv.convert(str(tmp_path / "x.npz"), str(tmp_path / "o1"))
  np.savez(str(tmp_path / "obj.npz"), a=np.asarray([{"x": 1}], dtype=object))
  with pytest.raises(common.ConvertError, match="refusing to read"):
    bv.convert(str(tmp_path / "obj.npz"), str(tmp_path / "o2"))
  # An unknown param (e.g. a pre-logits layer) is named instead of silently dropped.
  npz = _siglip_npz(str(tmp_path / "s.npz"))
  with np.load(npz) as z:
    w = dict(z)
  w["params/img/pre_logits/kernel"] = np.zeros((64, 64), np.float32)
  np.savez(str(tmp_path / "extra.npz"), **w)
  with pytest.raises(common.ConvertError, match="img/pre_logits/kernel .* no fszjax equivalent"):
    bv.convert(str(tmp_path / "extra.npz"), str(tmp_path / "o3"))
  assert not any(os.path.exists(tmp_path / f"o{i}") for i in (1, 2, 3))
