"""The CLIP BPE tokenizer gives open_clip's ids (vocabulary from the installed wheel)."""

import pickle

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip")

from fszjax import text as tokenizers  # noqa: E402
from fszjax.text import clip_bpe  # noqa: E402

TEXTS = [
    "a photo of a cat.", "Hello, World!! 123 don't we'll",
    "  Ünïcödé — naïve café ½ 日本語のテキスト",
    "&amp;lt;b&amp;gt; html   entities", "emoji 🙂🐈 _under_score_ -_- ", "", "x" * 300,
    "the glyph LATIN SMALL LETTER A WITH GRAVE", "<start_of_text>inner<end_of_text>",
]


@pytest.fixture(scope="module")
def tok():
  return clip_bpe.ClipBpeTokenizer.from_file()


def test_ids_match_open_clip(tok):
  assert (tok.vocab_size, tok.sot_id, tok.eot_id, tok.pad_id) == (49408, 49406, 49407, 0)
  np.testing.assert_array_equal(tok.encode(TEXTS, 77), open_clip.tokenize(TEXTS).numpy())
  np.testing.assert_array_equal(tok(TEXTS[:3], 8), open_clip.tokenize(TEXTS[:3], 8).numpy())
  assert tok.encode("x" * 300, 77)[0, -1] == tok.eot_id  # truncated text still ends with EOT


def test_decode_pickle_and_config_factory(tok, tmp_path):
  assert tok.decode(tok.encode(["a photo of a cat"], 16)) == ["a photo of a cat"]
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again.encode(TEXTS, 20), tok.encode(TEXTS, 20))
  path = tok.save(str(tmp_path / "tokenizer" / clip_bpe.BPE_FILENAME))
  t2 = tokenizers.from_config({"kind": "clip_bpe", "path": path})
  np.testing.assert_array_equal(t2.encode(TEXTS, 20), tok.encode(TEXTS, 20))
  assert tokenizers.from_config({"kind": "sentencepiece"}) is None


def test_missing_vocab_file_names_the_fix(tmp_path):
  with pytest.raises(clip_bpe.ClipBpeError, match="not found; pass the path"):
    clip_bpe.ClipBpeTokenizer.from_file(str(tmp_path / "nope.txt.gz"))
  (tmp_path / "bad.txt").write_text("#version\nab cd\n")
  with pytest.raises(clip_bpe.ClipBpeError, match="not a CLIP BPE merges file"):
    clip_bpe.ClipBpeTokenizer.from_file(str(tmp_path / "bad.txt"))
  with pytest.raises(tokenizers.TokenizerKindError, match="kind='wordpiece' is unknown"):
    tokenizers.from_config({"kind": "wordpiece"})
