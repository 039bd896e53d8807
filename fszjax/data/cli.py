"""`fszjax prepare ...`: build datasets into a TFDS data_dir (ArrayRecord, read by grain).

  fszjax prepare glyphs [--data_dir D] [--font_dir DIR ...] [--heldout_font_dir DIR ...]
                        [--heldout_fonts PATTERN ...] [--image_size N] [--max_chars N]
  fszjax prepare tfds NAME [--manual_dir M] [--data_dir D]
  fszjax prepare folder ROOT --name NAME [--data_dir D] [--layout auto|classes|domains]
  fszjax prepare captions MANIFEST --name NAME [--data_dir D]

`data_dir` defaults to TFDS's ($TFDS_DATA_DIR or ~/tensorflow_datasets). TensorFlow
Datasets loads when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

from fszjax.data import glyphs, image_text
from fszjax.data.errors import DataError
from fszjax.errors import is_user_error


def add_prepare_parser(subparsers) -> argparse.ArgumentParser:
  """Registers `prepare` (with glyphs / tfds / folder / captions) on `subparsers`.

  The handler is `args.func(args, overrides)`.
  """
  p = subparsers.add_parser("prepare", help="prepare a dataset (ArrayRecord) into a TFDS data_dir")
  ps = p.add_subparsers(dest="what", required=True)
  dd = dict(default=None, help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")

  g = ps.add_parser("glyphs", help="render the embedded Glyphs dataset from fonts")
  g.add_argument("--data_dir", **dd)
  g.add_argument("--font_dir", action="append", default=[],
                 help="extra font directory (repeatable); its fonts are training fonts unless held out")
  g.add_argument("--heldout_font_dir", action="append", default=[],
                 help="extra font directory whose fonts are all held out as test domains (repeatable)")
  g.add_argument("--heldout_fonts", action="append", default=[], metavar="PATTERN",
                 help="also hold out fonts whose name or family matches this fnmatch pattern, or "
                 "every font under this directory (repeatable; STIX* and cm* are always held out)")
  g.add_argument("--image_size", type=int, default=32, help="image side in pixels (default 32)")
  g.add_argument("--max_chars", type=int, default=None, help="keep at most N characters (quick builds)")

  t = ps.add_parser("tfds", help="download and prepare a TFDS catalog dataset in ArrayRecord")
  t.add_argument("name", help="TFDS name[/config][:version], e.g. cifar100, imagenet2012")
  t.add_argument("--data_dir", **dd)
  t.add_argument("--manual_dir", default=None, help="directory of manually downloaded files")

  f = ps.add_parser("folder", help="an image folder root/<class>/* or root/<domain>/<class>/*")
  f.add_argument("root")
  f.add_argument("--name", required=True, help="dataset name: read as user_image_folder/NAME")
  f.add_argument("--data_dir", **dd)
  f.add_argument("--layout", default="auto", choices=["auto", "classes", "domains"])

  c = ps.add_parser("captions", help="image-caption pairs from a TSV/CSV manifest")
  c.add_argument("manifest")
  c.add_argument("--name", required=True, help="dataset name: read as user_image_captions/NAME")
  c.add_argument("--data_dir", **dd)

  p.set_defaults(func=run_prepare)
  return p


# matplotlib's fonts that every default build excludes (not worth a line each).
_KNOWN_EXCLUDED = ("LastResortHE-Regular", "cmb10", "cmex10", "cmmi10", "cmr10", "cmss10",
                   "cmsy10", "cmti10", "cmtt10")


def glyphs_options(args):
  """The `GlyphsOptions` of `fszjax prepare glyphs` flags."""
  held = tuple(glyphs.DEFAULT_HELD_OUT_FONTS) + tuple(args.heldout_fonts) + tuple(
      os.path.abspath(d) for d in args.heldout_font_dir)
  for d in args.heldout_font_dir:
    if not os.path.isdir(d):
      raise FileNotFoundError(f"--heldout_font_dir {d!r} does not exist; pass an existing directory")
  return glyphs.GlyphsOptions(image_size=args.image_size,
                              font_dirs=tuple(args.font_dir) + tuple(args.heldout_font_dir),
                              max_chars=args.max_chars, held_out_fonts=held)


def _prepare_tfds(name: str, data_dir: str | None, manual_dir: str | None) -> str:
  import tensorflow_datasets as tfds  # noqa: PLC0415  (optional where only `bench` runs)

  data_dir = glyphs.default_data_dir(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # noqa: BLE001
    raise DataError(f"{name!r} is not a TFDS catalog dataset ({type(e).__name__}); check the name "
                    "(tfds.list_builders()) or use `fszjax prepare folder/captions` for your own "
                    "data") from None
  config = tfds.download.DownloadConfig(manual_dir=os.path.abspath(manual_dir) if manual_dir else None)
  builder.download_and_prepare(download_config=config, file_format="array_record")
  return str(builder.data_dir)


def run_prepare(args, overrides: Sequence = ()) -> int:
  """Runs `fszjax prepare ...`; prints where the data went and (for glyphs) the split counts."""
  del overrides
  start = time.time()
  if args.what == "glyphs":
    options = glyphs_options(args)
    was = glyphs.is_prepared(options, args.data_dir)
    path = glyphs.prepare(options, args.data_dir)
    meta = glyphs.read_metadata(path)
    print(f"glyphs {'already prepared' if was else 'prepared'} in {path} ({time.time() - start:.1f} s)")
    print(f"{'split':14s} {'examples':>9s} {'classes':>8s} {'fonts':>6s}")
    for split, s in meta["splits"].items():
      print(f"{split:14s} {s['num_examples']:9d} {s['num_classes']:8d} {len(s['fonts']):6d}")
    print(f"held-out fonts (test domains): {', '.join(meta['held_out_fonts']) or 'none'}")
    if meta.get("added_fonts"):
      print(f"added fonts: {', '.join(meta['added_fonts'])}")
    for font, why in meta["excluded_fonts"].items():
      if font not in _KNOWN_EXCLUDED:
        print(f"excluded font {font}: {why}")
    name = f"glyphs/{glyphs.config_name(options)}"
    data_dir = glyphs.default_data_dir(args.data_dir)
    print(f"read it with --config.data.name={name} --config.data.data_dir={data_dir}")
    if options != glyphs.GlyphsOptions(image_size=options.image_size, max_chars=options.max_chars):
      print("a model pretrained on another build keeps its own tokenizer (in its workdir): "
            "evaluate it here with `fszjax adapt --config.init_from=WORKDIR "
            f"--config.data.name={name} --config.data.data_dir={data_dir}`")
  elif args.what == "tfds":
    path = _prepare_tfds(args.name, args.data_dir, args.manual_dir)
    print(f"{args.name} prepared in {path} ({time.time() - start:.1f} s)")
  elif args.what == "folder":
    path = image_text.prepare_image_folder(args.root, args.name, args.data_dir, layout=args.layout)
    print(f"prepared {path} ({time.time() - start:.1f} s); read it with "
          f"--config.data.name=user_image_folder/{args.name}")
  elif args.what == "captions":
    path = image_text.prepare_image_captions(args.manifest, args.name, args.data_dir)
    print(f"prepared {path} ({time.time() - start:.1f} s); read it with "
          f"--config.data.name=user_image_captions/{args.name} --config.data.text_key=captions "
          "--config.data.label_key=None")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Standalone entry point: `python -m fszjax.data.cli prepare glyphs ...`."""
  parser = argparse.ArgumentParser(prog="fszjax")
  add_prepare_parser(parser.add_subparsers(dest="command", required=True))
  args = parser.parse_args(argv)
  try:
    return int(args.func(args, ()) or 0)
  except Exception as e:  # noqa: BLE001
    if is_user_error(e):
      print(f"fszjax: error: {e}", file=sys.stderr)
      return 2
    raise


if __name__ == "__main__":
  sys.exit(main())
