"""TFDS builders for users' own data, so few-shot and domain data work without code.

Two builders, both writing ArrayRecord under `<data_dir>/<builder>/<name>/<version>`:

* `user_image_folder/<name>`: an image folder `root/<class name>/*.jpg`, or with domains
  `root/<domain>/<class name>/*.jpg`. If `root` holds `train/`, `val/` (or
  `validation/`) or `test/` directories, each is a split; otherwise everything is
  `train`. Features: `image` (the file's bytes, verbatim), `label` (ClassLabel over the
  sorted class names of all splits), `text` (class name, "_" and "-" -> " "), `domain`
  (ClassLabel over domains; "default" without domains), `file_name`.
* `user_image_captions/<name>`: a TSV or CSV manifest with rows `image_path<TAB>caption`
  (optionally a third `split` column; an optional header row is detected). Relative
  paths are resolved against the manifest's directory; rows of the same image are
  grouped. Features: `image`, `captions` (sequence of text), `file_name`.

Files are stored verbatim (no re-encoding): an unreadable image is kept and the
pipeline skips and counts it at read time. Missing files are reported at prepare time.

Prepare from the command line:

  fszjax prepare folder ROOT --name birds [--data_dir D]
  fszjax prepare captions MANIFEST.tsv --name pets [--data_dir D]

and read with `data.name = "user_image_folder/birds"` (or `user_image_captions/pets`).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from typing import Any

from etils import epath

from fszjax.data.glyphs import default_data_dir
from fszjax.errors import UserError

log = logging.getLogger(__name__)

VERSION = "1.0.0"
_VERSION = VERSION
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_DIRS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
FOLDER_BUILDER = "user_image_folder"
CAPTIONS_BUILDER = "user_image_captions"


class UserDataError(UserError):
  """Bad user data (missing folder, empty manifest, ...); the message names the fix."""


def _check_name(name: str) -> str:
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
    raise UserDataError(f"dataset name {name!r} is invalid; use letters, digits, '_', '-', '.'")
  return name


def class_text(name: str) -> str:
  """Folder name -> class text ("sea_lion" -> "sea lion")."""
  return re.sub(r"[_\-]+", " ", name).strip()


def _is_image(path: str) -> bool:
  return path.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
  return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))


def _images_in(path: str) -> list[str]:
  out = []
  for dirpath, dirnames, files in os.walk(path):
    dirnames.sort()
    out += [os.path.join(dirpath, f) for f in sorted(files) if _is_image(f) and not f.startswith(".")]
  return out


def scan_image_folder(root: str, layout: str = "auto") -> dict[str, list[tuple[str, str, str]]]:
  """split -> [(path, class name, domain)] of an image folder.

  layout: "classes" (root/<class>/*), "domains" (root/<domain>/<class>/*) or "auto" (domains
  when every top-level directory holds only directories).
  """
  if not os.path.isdir(root):
    raise UserDataError(f"image folder {root!r} does not exist; pass the directory holding <class>/ folders")
  if layout not in ("auto", "classes", "domains"):
    raise UserDataError(f"layout={layout!r} is unknown; use auto, classes or domains")
  top = _subdirs(root)
  split_roots = {SPLIT_DIRS[d]: os.path.join(root, d) for d in top if d in SPLIT_DIRS}
  if not split_roots:
    split_roots = {"train": root}
  out: dict[str, list[tuple[str, str, str]]] = {}
  for split, sroot in sorted(split_roots.items()):
    dirs = _subdirs(sroot)
    use_domains = layout == "domains" or (layout == "auto" and dirs and all(
        _subdirs(os.path.join(sroot, d)) and not any(
            _is_image(f) for f in os.listdir(os.path.join(sroot, d))) for d in dirs))
    rows = []
    for d in dirs:
      if use_domains:
        for c in _subdirs(os.path.join(sroot, d)):
          rows += [(p, c, d) for p in _images_in(os.path.join(sroot, d, c))]
      else:
        rows += [(p, d, "default") for p in _images_in(os.path.join(sroot, d))]
    if rows:
      out[split] = rows
  if not out:
    raise UserDataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root!r} in "
                        "<class>/ or <domain>/<class>/ folders")
  return out


IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename", "file_name", "filepath", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "description", "label")


def _decode_manifest(path: str) -> str:
  """The manifest's text; a one-line error naming the first line that is not UTF-8."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b"\n") + 1
    col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    raise UserDataError(f"manifest {path}: line {line} is not UTF-8 (byte 0x{raw[e.start]:02x} at "
                        f"column {col}); re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                        ) from None


def read_manifest(path: str) -> dict[str, list[tuple[str, list[str]]]]:
  """split -> [(image path, [captions])] of a TSV/CSV manifest (rows of one image grouped).

  Rows are ``image_path, caption[, split]``, optionally under a header row naming those
  columns (``image_path``/``image``/``path``/``file`` ..., ``caption``/``text`` ...).
  A first row that is neither a known header nor an image row, a line that is not
  UTF-8, a row with one column, or a manifest whose images all are missing is a one-line
  `UserDataError`; rows with an empty caption are skipped with one warning and a count.
  """
  if not os.path.isfile(path):
    raise UserDataError(f"manifest {path!r} not found; pass a .tsv/.csv file of image_path, caption rows")
  text = _decode_manifest(path)
  first = text.split("\n", 1)[0]
  delimiter = "\t" if path.lower().endswith(".tsv") or "\t" in first else ","
  reader = csv.reader(text.splitlines(), delimiter=delimiter)
  rows = []
  for r in reader:
    if r and any(c.strip() for c in r):
      rows.append((reader.line_num, r))
  base = os.path.dirname(os.path.abspath(path))
  need = "image_path<TAB>caption[<TAB>split] (a header row is optional)"
  if rows:
    line, head = rows[0]
    cells = [c.strip().lower() for c in head]
    if cells[0] in IMAGE_COLUMNS:
      if len(cells) < 2 or cells[1] not in CAPTION_COLUMNS:
        raise UserDataError(
            f"manifest {path}: header {head} has no caption column after {head[0]!r}; name the "
            f"columns {need}, e.g. image_path, caption")
      rows = rows[1:]
    elif not _is_image(cells[0]) and not os.path.exists(
        cells[0] if os.path.isabs(head[0].strip()) else os.path.join(base, head[0].strip())):
      raise UserDataError(
          f"manifest {path}: line {line} {head} is neither a header with the required columns "
          f"(image_path, caption) nor an image row; rows must be {need}")
  grouped: dict[str, dict[str, list[str]]] = {}
  empty, first_empty = 0, 0
  for line, r in rows:
    if len(r) < 2:
      raise UserDataError(f"{path}: line {line} has {len(r)} column(s); each row needs "
                          "image_path and caption")
    img = r[0].strip()
    img = img if os.path.isabs(img) else os.path.join(base, img)
    if not r[1].strip():
      empty += 1
      first_empty = first_empty or line
      continue
    split = r[2].strip() if len(r) > 2 and r[2].strip() else "train"
    grouped.setdefault(split, {}).setdefault(img, []).append(r[1].strip())
  if empty:
    log.warning("manifest %s: %d row(s) with an empty caption skipped (first: line %d)", path,
                empty, first_empty)
  if not grouped:
    raise UserDataError(f"manifest {path!r} has no rows with a caption; add image_path<TAB>caption "
                        "lines")
  images = [img for d in grouped.values() for img in d]
  if not any(os.path.isfile(img) for img in images):
    raise UserDataError(f"manifest {path}: none of its {len(images)} image(s) exist (first: "
                        f"{images[0]}); relative paths are resolved against the manifest's "
                        "directory")
  return {s: sorted(d.items()) for s, d in sorted(grouped.items())}


def _user_builder_base(tfds):
  """The abstract base of both builders: version, release notes, code path (not registered)."""

  class UserBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(_VERSION)
    RELEASE_NOTES = {_VERSION: "First release."}
    BUILDER_CONFIGS = []

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):  # noqa: N805
      return epath.Path(os.path.abspath(__file__))

  return UserBuilder


def _make_folder_builder(tfds, base):
  """The `user_image_folder` builder and its config class."""

  @dataclasses.dataclass(eq=False)
  class UserImageFolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    layout: str = "auto"

  class UserImageFolder(base):
    """Image folder root/<class>/* or root/<domain>/<class>/* (see module docstring)."""

    def _scan(self):
      if not hasattr(self, "_rows"):
        self._rows = scan_image_folder(self.builder_config.root, self.builder_config.layout)
      return self._rows

    def _info(self):
      rows = self._scan() if self.builder_config.root else {}
      classes = sorted({c for r in rows.values() for _, c, _ in r})
      domains = sorted({d for r in rows.values() for _, _, d in r})
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"Image folder {self.builder_config.root}",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "label": tfds.features.ClassLabel(names=classes or ["none"]),
              "text": tfds.features.Text(),
              "domain": tfds.features.ClassLabel(names=domains or ["default"]),
              "file_name": tfds.features.Text(),
          }),
          supervised_keys=("image", "label"),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: self._generate_examples(rows) for s, rows in self._scan().items()}

    def _generate_examples(self, rows):
      root = self.builder_config.root
      for path, cls, dom in rows:
        rel = os.path.relpath(path, root)
        yield rel, {"image": path, "label": cls, "text": class_text(cls), "domain": dom, "file_name": rel}

  return UserImageFolder, UserImageFolderConfig


def _make_captions_builder(tfds, base):
  """The `user_image_captions` builder and its config class."""

  @dataclasses.dataclass(eq=False)
  class UserImageCaptionsConfig(tfds.core.BuilderConfig):
    manifest: str = ""

  class UserImageCaptions(base):
    """Image-caption pairs from a TSV/CSV manifest (see module docstring)."""

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description=f"Image-caption pairs from {self.builder_config.manifest}",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "captions": tfds.features.Sequence(tfds.features.Text()),
              "file_name": tfds.features.Text(),
          }),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      rows = read_manifest(self.builder_config.manifest)
      return {s: self._generate_examples(r) for s, r in rows.items()}

    def _generate_examples(self, rows):
      missing = 0
      for path, caps in rows:
        if not os.path.isfile(path):
          missing += 1
          if missing <= 5:
            log.warning("manifest image %s not found; row skipped", path)
          continue
        yield path, {"image": path, "captions": caps, "file_name": os.path.basename(path)}
      if missing:
        log.warning("%d manifest image(s) not found and skipped", missing)

  return UserImageCaptions, UserImageCaptionsConfig


def _make_builders():
  # tensorflow_datasets: heavy to import (seconds) and importing it registers builders;
  # loaded only when a user dataset is prepared.
  import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy; only when preparing)

  base = _user_builder_base(tfds)
  return {
      FOLDER_BUILDER: _make_folder_builder(tfds, base),
      CAPTIONS_BUILDER: _make_captions_builder(tfds, base),
  }


_BUILDERS: dict[str, Any] | None = None


def builders():
  """{"user_image_folder": (builder class, config class), "user_image_captions": (...)}."""
  global _BUILDERS
  if _BUILDERS is None:
    _BUILDERS = _make_builders()
  return _BUILDERS


def _prepare(kind: str, name: str, data_dir: str | None, **config_kwargs) -> str:
  _check_name(name)
  builder_cls, config_cls = builders()[kind]
  data_dir = default_data_dir(data_dir)
  builder = builder_cls(config=config_cls(name=name, **config_kwargs), data_dir=data_dir,
                        file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  return os.path.join(data_dir, kind, name, VERSION)


def prepare_image_folder(root: str, name: str, data_dir: str | None = None, layout: str = "auto") -> str:
  """Prepares `root/<class>/*` (or `root/<domain>/<class>/*`) as `user_image_folder/<name>`.

  Returns the dataset directory. Re-preparing an existing name is a no-op (delete the
  directory to rebuild).
  """
  _check_name(name)
  scan_image_folder(root, layout)  # fail fast with a clear message
  return _prepare(FOLDER_BUILDER, name, data_dir, root=os.path.abspath(root), layout=layout)


def prepare_image_captions(manifest: str, name: str, data_dir: str | None = None) -> str:
  """Prepares a TSV/CSV manifest of (image path, caption) as `user_image_captions/<name>`."""
  _check_name(name)
  read_manifest(manifest)
  return _prepare(CAPTIONS_BUILDER, name, data_dir, manifest=os.path.abspath(manifest))
