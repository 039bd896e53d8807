"""`fszjax adapt --config C --workdir W`: few-shot adaptation / meta-training + evaluation."""

from __future__ import annotations

import os
import shutil

from fszjax import config as config_lib
from fszjax.fewshot import adapt
from fszjax.fewshot.results import results_markdown
from fszjax.train_cli import _logging


def _cmd_adapt(args, overrides) -> int:
  _logging()
  cfg = config_lib.load_config(args.config, overrides)
  if args.fresh and os.path.isdir(args.workdir):
    shutil.rmtree(args.workdir)
  results = adapt.run(cfg, args.workdir)
  print(results_markdown(results))
  print(f"results: {args.workdir}/results.json")
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser("adapt", help="few-shot adaptation / meta-learning and its evaluation")
  p.add_argument("--config", required=True, help="e.g. configs/glyphs_fewshot.py")
  p.add_argument("--workdir", required=True)
  p.add_argument("--fresh", action="store_true", help="delete the workdir first")
  p.set_defaults(func=_cmd_adapt)
