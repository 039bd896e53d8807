"""`fszjax pretrain` and `fszjax eval`."""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax

from fszjax import checkpoint as ckpt_lib
from fszjax import config as config_lib
from fszjax import evaluate, inference, pretrain, sharding
from fszjax import metrics as metrics_lib
from fszjax import workdir as workdir_lib
from fszjax.data import errors as data_errors


def _logging():
  metrics_lib.setup_logging()


def _cmd_pretrain(args, overrides) -> int:
  _logging()
  cfg = config_lib.load_config(args.config, overrides)
  if args.fresh and os.path.isdir(args.workdir):
    holder = workdir_lib.is_locked(args.workdir)
    if holder:  # never delete the workdir of a running run
      raise workdir_lib.WorkdirError(f"--fresh: workdir {args.workdir} is in use by another run "
                                     f"({holder}); wait for it or stop it first")

    shutil.rmtree(args.workdir)
  summary = pretrain.train(cfg, args.workdir, stop_at=args.stop_at)
  if summary.get("stopped_early") or jax.process_index() != 0:
    return 0
  zs = summary.get("zeroshot", {})
  for split, m in zs.items():
    print(f"zero-shot {split}: top1={m['top1']:.3f} (chance {m['chance']:.4f}, "
          f"{m['num_classes']} classes, {m['num_examples']} images)")
  print(f"summary: {os.path.join(args.workdir, 'summary.json')}")
  return 0


def evaluate_checkpoint(workdir: str | None, checkpoint: str | None, overrides=(), devices=None,
                        out_path: str | None = None) -> dict:
  """Restores a checkpoint on this machine's mesh and runs the evaluators."""
  src = checkpoint or workdir
  if src is None:
    raise config_lib.ConfigError("pass --workdir or --checkpoint")
  step_dir = ckpt_lib.resolve_step_dir(src)
  # config.json of the workdir (paths resolved against it), else the checkpoint's own.
  try:
    cfg, base_dir = inference.load_config(workdir if workdir and os.path.isfile(
        os.path.join(workdir, "config.json")) else step_dir)
  except inference.LoadError:
    raise ckpt_lib.CheckpointError(f"no config found next to {step_dir}") from None
  for k, v in overrides:
    config_lib.apply_override(cfg, k, v)
  config_lib.validate(cfg)
  # The current machine's mesh: all local devices on the batch axes unless overridden.
  keys = {k for k, _ in overrides}
  if not any(k.startswith("mesh.") for k in keys):
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = -1, 1, 1
  mesh = sharding.mesh_from_config(cfg.mesh, devices=devices)
  rules = sharding.rules_from_config(cfg)
  abstract = pretrain.abstract_train_state(cfg, mesh, rules)
  # A step directory restores exactly that step; a workdir its newest readable one.
  given_step = os.path.isdir(os.path.join(os.path.abspath(os.path.expanduser(src)), "state"))
  step = int(os.path.basename(step_dir)) if given_step else None
  ckpt = ckpt_lib.Checkpointer(os.path.dirname(step_dir), read_only=True)
  step, state = ckpt.restore(abstract, step=step)
  model = pretrain.build_model(cfg.model)
  tokenizer = inference.model_tokenizer(cfg, base_dir)  # the model's own (its workdir's copy)
  try:
    with jax.set_mesh(mesh):
      result = evaluate.run_evaluators(cfg, model, state.params, tokenizer)
  except data_errors.DataError as e:
    raise data_errors.DataError(
        f"{e}; or, where the dataset is prepared elsewhere, pass --config.data.data_dir=DIR "
        "(another dataset: --config.data.name=NAME, --config.eval.splits=[...])") from None
  result = {"steps": step, **result}
  out_path = out_path or os.path.join(workdir or os.path.dirname(os.path.dirname(step_dir)),
                                      "eval.json")
  if jax.process_index() == 0:
    with open(out_path, "w") as f:
      json.dump(result, f, indent=2)
  return result


def _cmd_eval(args, overrides) -> int:
  _logging()
  result = evaluate_checkpoint(args.workdir, args.checkpoint, overrides, out_path=args.out)
  for split, m in result["zeroshot"].items():
    print(f"zero-shot {split}: top1={m['top1']:.3f} top5={m['top5']:.3f} "
          f"(chance {m['chance']:.4f})")
  for split, m in result["retrieval"].items():
    print(f"retrieval {split}: " + " ".join(f"{k}={m[k]:.3f}" for k in sorted(m) if "_r" in k))
  return 0


def add_parsers(sub) -> None:
  p = sub.add_parser("pretrain", help="contrastive pretraining (resumes from the workdir)")
  p.add_argument("--config", required=True, help="config file, e.g. configs/glyphs.py")
  p.add_argument("--workdir", required=True, help="output directory (checkpoints, metrics)")
  p.add_argument("--fresh", action="store_true", help="delete the workdir first")
  p.add_argument("--stop_at", type=int, default=None,
                 help="save and stop after this step, as a preemption would")
  p.set_defaults(func=_cmd_pretrain)

  e = sub.add_parser("eval", help="restore a checkpoint and run the evaluators")
  e.add_argument("--workdir", default=None)
  e.add_argument("--checkpoint", default=None, help="checkpoint step directory (default: latest)")
  e.add_argument("--out", default=None, help="output JSON (default WORKDIR/eval.json)")
  e.set_defaults(func=_cmd_eval)
