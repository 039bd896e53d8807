"""Default data configs: every key `fszjax.data.pipeline` reads, with its meaning.

`glyphs_data_config()` is the embedded default (`configs/glyphs.py` sets
`config.data = glyphs_data_config()`); `tfds_data_config(name, ...)` is a starting point
for catalog datasets (imagenet2012, cifar100, omniglot, coco_captions, domainnet) and
users' own prepared data.
"""

from __future__ import annotations

import ml_collections

GLYPH_PROMPT_TEMPLATES = (
    "{}",
    "the character {}",
    "the glyph {}",
    "the symbol {}",
    "a picture of the character {}",
    "the unicode character {}",
)

IMAGE_PROMPT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
)

GLYPH_EVAL_SPLITS = ("val", "test_classes", "test_scripts", "test_fonts", "test_both")


def _augment(affine: bool, random_resized_crop: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      # Small affine jitter (glyphs): rotation, isotropic scale, translation, shear.
      "affine": affine,
      "rotate_deg": 8.0,
      "scale": (0.9, 1.1),
      "translate": 0.06,  # fraction of the image side
      "shear_deg": 6.0,
      # Random resized crop (natural images): area fraction and aspect-ratio range.
      "random_resized_crop": random_resized_crop,
      "crop_scale": (0.5, 1.0),
      "crop_ratio": (0.75, 1.3333),
      "hflip": False,
      # Stroke-width jitter (glyphs): probability of a 2x2 dilation or erosion of the ink
      # (`fszjax.data.preprocess.stroke_jitter`); 0 = off.
      "stroke": 0.0,
  })


def _tokenizer(vocab_size: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      # An existing SentencePiece .model; None = train one on the training text (class
      # names for label datasets) and cache it next to the data (or in cache_dir).
      "path": ml_collections.FieldReference(None, field_type=str),
      "vocab_size": vocab_size,  # EOT included; EOT is the highest id
      "model_type": "bpe",       # unigram | bpe | word | char
      "cache_dir": ml_collections.FieldReference(None, field_type=str),
      "max_texts": 200_000,      # at most this many training texts are read
  })


def glyphs_data_config() -> ml_collections.ConfigDict:
  """Data config of the embedded Glyphs dataset (32x32 grayscale, CPU-friendly)."""
  c = ml_collections.ConfigDict()
  # Where prepared datasets live; None = TFDS default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.data_dir = ml_collections.FieldReference(None, field_type=str)
  # TFDS name[/config][:version]. "glyphs" resolves to glyphs/<image_size>px[...] from `glyphs`.
  c.name = "glyphs"
  # Options of the Glyphs build to read (must match `fszjax prepare glyphs` flags).
  c.glyphs = ml_collections.ConfigDict({
      "image_size": ml_collections.FieldReference(None, field_type=int),  # None = image_size
      "font_dirs": (),
      "max_chars": ml_collections.FieldReference(None, field_type=int),
      # Fonts held out as test domains besides STIX* and cm*: name / family patterns or
      # directories (`fszjax prepare glyphs --heldout_fonts` / `--heldout_font_dir`).
      "held_out_fonts": (),
  })
  c.train_split = "train"
  c.eval_splits = GLYPH_EVAL_SPLITS
  # Feature keys ("a/b" for nested features). text_key None = text from class names
  # (label_key's ClassLabel names or Glyphs metadata) through train_templates.
  c.image_key = "image"
  c.label_key = ml_collections.FieldReference("label", field_type=str)
  c.text_key = ml_collections.FieldReference("text", field_type=str)
  c.domain_key = ml_collections.FieldReference("font", field_type=str)
  # Optional text file with one class name per line (label order), overriding the dataset's
  # names (e.g. readable ImageNet names instead of WordNet ids).
  c.class_names_file = ml_collections.FieldReference(None, field_type=str)
  # "pil": raw bytes decoded by PIL in the pipeline (undecodable images are skipped and
  # counted); "tfds": TFDS decodes (no skipping).
  c.image_decoder = "pil"
  # Preprocessing: images become float32 (H, W, C) = ((x / 255) - mean) / std.
  c.image_size = 32
  c.channels = 1
  c.mean = (0.5,)
  c.std = (0.5,)
  c.augment = _augment(affine=True, random_resized_crop=False)
  # Text: tokens int32 (max_text_len,) = pieces, EOT, pad 0.
  c.max_text_len = 16
  c.tokenizer = _tokenizer(vocab_size=1024)
  c.train_templates = ("{}",)
  # Zero-shot classifier texts: the bare name, as trained. Averaging the six
  # GLYPH_PROMPT_TEMPLATES costs ~20 points of zero-shot top-1 on test_classes (29.5 vs
  # 8.7 %), even for a model trained with them (32.5 vs 11.2 %): the tiny text tower
  # embeds the template words, and long names get cut at 16 tokens (BUILD_NOTES.md,
  # "Transfer: second round").
  c.prompt_templates = ("{}",)
  # Mixture: list of dicts overriding any key above for one component, plus "weight",
  # e.g. [{"name": "glyphs", "weight": 3}, {"name": "omniglot", "text_key": None,
  # "label_key": "label", "weight": 1}]. Empty = the single dataset above.
  c.mixture = ()
  c.shuffle = True
  # Reading: decode threads per process; >0 workers = grain worker processes.
  c.num_threads = 2
  c.prefetch_buffer_size = 64
  c.num_workers = 0
  c.worker_buffer_size = 2
  return c


def tfds_data_config(name: str, *, image_size: int = 224, text_key: str | None = None,
                     label_key: str | None = "label", domain_key: str | None = None,
                     train_split: str = "train", eval_splits=("validation",)) -> ml_collections.ConfigDict:
  """Data config for a catalog or user dataset read through TFDS (RGB, CLIP normalisation).

  E.g. `tfds_data_config("cifar100", image_size=32)`,
  `tfds_data_config("coco_captions", text_key="captions/text", label_key=None)`.
  """
  c = glyphs_data_config()
  c.name = name
  c.image_size = image_size
  c.channels = 3
  c.mean = (0.48145466, 0.4578275, 0.40821073)
  c.std = (0.26862954, 0.26130258, 0.27577711)
  c.augment = _augment(affine=False, random_resized_crop=True)
  c.label_key = label_key
  c.text_key = text_key
  c.domain_key = domain_key
  c.train_split = train_split
  c.eval_splits = tuple(eval_splits)
  c.max_text_len = 32
  c.prompt_templates = IMAGE_PROMPT_TEMPLATES
  c.tokenizer.vocab_size = 8192
  return c


# Keys of ``config.data`` in an adapt config with the pretrained towers: the evaluation
# dataset. None = the model's own (its pretraining dataset); a new ``name`` starts from that
# kind of dataset's defaults above. The model's preprocessing (image size, channels, mean /
# std, text length) and tokenizer always come from the model.
DATASET_KEYS = ("name", "data_dir", "train_split", "eval_splits", "image_key", "label_key",
                "text_key", "domain_key", "class_names_file", "image_decoder",
                "prompt_templates", "num_threads")
GLYPH_KEYS = ("image_size", "font_dirs", "max_chars")


def data_overrides() -> ml_collections.ConfigDict:
  """The ``data`` section of an adapt config with the pretrained towers: every dataset key
  (`DATASET_KEYS`) unset (None = the model's own); partial by design."""
  d = ml_collections.ConfigDict({k: None for k in DATASET_KEYS})
  d.glyphs = ml_collections.ConfigDict({k: None for k in GLYPH_KEYS})
  return d
