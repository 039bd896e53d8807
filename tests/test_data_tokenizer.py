"""SentencePiece tokenizer: fixed-length batches, pad / EOT conventions, vocab size."""

import pickle

import numpy as np
import pytest

from fszjax.text import sentencepiece as T

TEXTS = [
    "latin small letter a", "latin capital letter a with acute", "greek small letter alpha",
    "greek small letter alpha with tonos", "cyrillic small letter ze", "rightwards arrow",
    "leftwards double arrow", "box drawings light horizontal", "digit seven", "full stop",
] * 3


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("tok") / "spm")
  return T.train_sentencepiece(TEXTS, prefix, vocab_size=64, model_type="bpe")


def test_vocab_size_honoured_and_eot_is_max(tok):
  assert tok.vocab_size == 64
  assert tok.eot_id == 63 == tok.vocab_size - 1
  assert tok.pad_id == 0
  toks = tok.encode(TEXTS, 16)
  assert toks.max() == tok.eot_id
  assert (toks < tok.vocab_size).all() and (toks >= 0).all()


def test_round_trip(tok):
  toks = tok.encode(TEXTS[:10], 48)
  assert tok.decode(toks) == TEXTS[:10]
  assert tok.decode(toks[0]) == [TEXTS[0]]


def test_pad_and_eot_positions(tok):
  toks = tok.encode(["full stop", "greek small letter alpha with tonos"], 48)
  assert toks.dtype == np.int32 and toks.shape == (2, 48)
  for row in toks:
    (eot,) = np.nonzero(row == tok.eot_id)[0]
    assert (row[:eot] != 0).all() and (row[:eot] != tok.eot_id).all()
    assert (row[eot + 1:] == 0).all()
    assert int(np.argmax(row)) == eot  # the text tower's `eot` pooling


def test_truncation_keeps_eot_last(tok):
  toks = tok.encode(["greek small letter alpha with tonos " * 5], 6)
  assert toks.shape == (1, 6) and toks[0, -1] == tok.eot_id and (toks[0, :-1] != 0).all()
  with pytest.raises(T.TokenizerError, match="max_len"):
    tok.encode(["a"], 1)


def test_empty_text_is_just_eot(tok):
  assert tok.encode([""], 4).tolist() == [[tok.eot_id, 0, 0, 0]]


def test_save_load_and_pickle(tok):
  loaded = T.load_tokenizer(tok.path)
  assert np.array_equal(loaded.encode(TEXTS, 12), tok.encode(TEXTS, 12))
  clone = pickle.loads(pickle.dumps(tok))
  assert np.array_equal(clone.encode(TEXTS, 12), tok.encode(TEXTS, 12))


def test_training_is_deterministic():
  a = T.train_sentencepiece(TEXTS, None, 48, "unigram")
  b = T.train_sentencepiece(TEXTS, None, 48, "unigram")
  assert a.model_proto == b.model_proto and a.vocab_size == 48


def test_foreign_model_without_pad_zero_is_shifted(tmp_path):
  import io

  import sentencepiece as spm

  buf = io.BytesIO()  # SentencePiece defaults: unk=0, bos=1, eos=2, no pad
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=buf, vocab_size=40,
                                 model_type="bpe", minloglevel=2)
  (tmp_path / "x.model").write_bytes(buf.getvalue())
  tok = T.load_tokenizer(str(tmp_path / "x.model"))
  assert tok.vocab_size == 42 and tok.eot_id == 41
  toks = tok.encode(["digit seven zzz"], 12)
  assert (toks[0][: np.argmax(toks[0])] > 0).all()  # unk (0 in the model) no longer collides with pad
  assert tok.decode(toks)[0].startswith("digit seven")


def test_clear_errors(tmp_path):
  with pytest.raises(T.TokenizerError, match="use <="):
    T.train_sentencepiece(TEXTS, None, 5000, "bpe")
  with pytest.raises(T.TokenizerError, match="model_type"):
    T.train_sentencepiece(TEXTS, None, 64, "wordpiece")
  with pytest.raises(T.TokenizerError, match="not found"):
    T.load_tokenizer(str(tmp_path / "missing.model"))
  (tmp_path / "junk.model").write_bytes(b"junk")
  with pytest.raises(T.TokenizerError, match="not a SentencePiece model"):
    T.load_tokenizer(str(tmp_path / "junk.model"))
