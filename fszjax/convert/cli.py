"""`fszjax convert open_clip | big_vision | to_open_clip`."""

from __future__ import annotations

import json
import os

from fszjax.convert import big_vision, open_clip
from fszjax.convert.common import ConvertError


def _cmd_open_clip(args, overrides) -> int:
  del overrides

  if not args.model and not args.model_config:
    raise ConvertError("pass --model NAME (e.g. ViT-B-32, ViT-L-14-quickgelu) or --model_config "
                       "FILE.json")
  out = open_clip.convert(args.model_config or args.model, args.weights, args.out,
                          quick_gelu=True if args.quick_gelu else None, bpe_path=args.bpe,
                          scan_layers=args.scan_layers, overwrite=args.overwrite)
  print(f"wrote {out} (config.json, checkpoints/0, tokenizer/); try: fszjax eval --workdir {out} "
        "--config.data.name=<tfds dataset>")
  return 0


def _cmd_big_vision(args, overrides) -> int:
  del overrides

  out = big_vision.convert(args.weights, args.out, tokenizer=args.tokenizer,
                           image_size=args.image_size, text_pool=args.text_pool, act=args.act,
                           text_eos=args.text_eos, text_pad=args.text_pad,
                           text_clean=args.text_clean, scan_layers=args.scan_layers,
                           overwrite=args.overwrite)
  print(f"wrote {out} (config.json, checkpoints/0{', tokenizer/' if args.tokenizer else ''})")
  if not args.tokenizer:
    print("note: no --tokenizer given; pass the checkpoint's SentencePiece .model to encode text")
  return 0


def _cmd_to_open_clip(args, overrides) -> int:
  del overrides

  res = open_clip.export_workdir(args.workdir, args.out, overwrite=args.overwrite)
  print(f"wrote {res['weights']} and {res['config']}")

  d = os.path.dirname(res["weights"])
  print(f"load it: open_clip.create_model('local-dir:{d}')")
  if res["builtin"]:
    print(f"  or: open_clip.create_model('{res['builtin']}', pretrained='{res['weights']}')")
  else:
    print("  model_cfg: " + json.dumps(res["model_cfg"]))
  return 0


def _import_args(p, weights_help: str) -> None:
  """The arguments every weight import takes."""
  p.add_argument("--weights", required=True, help=weights_help)
  p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  p.add_argument("--scan_layers", action="store_true",
                 help="write the scanned block layout (config.model.scan_layers=True)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def add_parsers(sub) -> None:
  p = sub.add_parser("convert", help="import open_clip / big_vision weights, export to open_clip")
  conv = p.add_subparsers(dest="convert_kind", required=True)

  o = conv.add_parser("open_clip", help="open_clip ViT CLIP weights -> fszjax directory")
  o.add_argument("--model", default=None,
                 help="open_clip model name, e.g. ViT-B-32, ViT-B-16, ViT-L-14 (add -quickgelu "
                      "for OpenAI's original weights)")
  o.add_argument("--model_config", default=None,
                 help="open_clip model config JSON instead of --model (custom architectures)")
  _import_args(o, ".safetensors or torch state dict (.pt/.bin)")
  o.add_argument("--quick_gelu", action="store_true", help="force QuickGELU (OpenAI weights)")
  o.add_argument("--bpe", default=None,
                 help="bpe_simple_vocab_16e6.txt.gz (default: the one in the installed open_clip)")
  o.set_defaults(func=_cmd_open_clip)

  b = conv.add_parser("big_vision", help="big_vision SigLIP/LiT two-tower .npz -> fszjax directory")
  _import_args(b, "big_vision checkpoint .npz")
  b.add_argument("--tokenizer", default=None, help="the checkpoint's SentencePiece .model")
  b.add_argument("--image_size", type=int, default=None,
                 help="only for sincos position embeddings (otherwise read from the weights)")
  b.add_argument("--text_pool", default="last", choices=["last", "first"])
  b.add_argument("--act", default="gelu_tanh", choices=["gelu_tanh", "gelu"],
                 help="MLP activation (big_vision's nn.gelu is the tanh approximation)")
  b.add_argument("--text_eos", default="sticky", choices=["sticky", "yes", "none"])
  b.add_argument("--text_pad", type=int, default=1, help="pad id (SigLIP: 1)")
  b.add_argument("--text_clean", default="canonicalize", choices=["canonicalize", "lower", "none"])
  b.set_defaults(func=_cmd_big_vision)

  e = conv.add_parser("to_open_clip", help="fszjax CLIP-style model -> open_clip safetensors")
  e.add_argument("--workdir", required=True, help="fszjax workdir, converted dir or checkpoint")
  e.add_argument("--out", required=True,
                 help="FILE.safetensors or a directory (open_clip_model.safetensors); "
                      "open_clip_config.json is written beside it")
  e.add_argument("--overwrite", action="store_true", help="replace existing files")
  e.set_defaults(func=_cmd_to_open_clip)
