"""`python -m fszjax.report`: every number in report.md / README comes from the run's files."""

import json
import os

from fszjax import report


def _r(mean, ci=0.01, episodes=600):
  return {"mean": mean, "ci95": ci, "episodes": episodes}


def _fake_run(root):
  os.makedirs(os.path.join(root, "pretrain"))
  os.makedirs(os.path.join(root, "adapt"))
  os.makedirs(os.path.join(root, "maml_conv4"))
  summary = {"steps": 500, "wall_time_s": 300.0,
             "zeroshot": {"test_classes": {"top1": 0.0485, "top1_ci95": 0.0076, "top5": 0.2,
                                           "num_classes": 272, "chance": 1 / 272}},
             "retrieval": {}}
  with open(os.path.join(root, "pretrain", "summary.json"), "w") as f:
    json.dump(summary, f)
  with open(os.path.join(root, "pretrain", "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 1, "loss": 5.0}) + "\n")
    for step, acc in ((100, 0.02), (200, 0.035), (300, 0.0485)):
      f.write(json.dumps({"step": step, "loss": 4.0, "i2t_acc": 0.1, "lr": 1e-3,
                          "zeroshot/test_classes/top1": acc, "zeroshot/test_classes/top1_ci95": 0.007,
                          "zeroshot/test_classes/chance": 1 / 272}) + "\n")
  with open(os.path.join(root, "adapt", "metrics.jsonl"), "w") as f:
    for step in range(10, 101, 10):
      f.write(json.dumps({"step": step, "loss": 1.0 / step, "acc": 0.5 + step / 400}) + "\n")
  with open(os.path.join(root, "stage_times.tsv"), "w") as f:
    f.write("prepare\t40\npretrain\t300\npretrain\t290\nadapt\t200\n")
  adapt = {"methods": {"zeroshot": {"test_fonts": {"5way5shot": _r(0.254, 0.006), "5way1shot": _r(0.21),
                                                   "20way1shot": _r(0.08)},
                                    "test_classes": {"5way1shot": _r(0.4), "5way5shot": _r(0.5)}},
                       "zs_head_adapt": {"test_fonts": {"5way5shot": _r(0.326, 0.008)}},
                       "anil": {"test_fonts": {"5way5shot": _r(0.341, 0.009)}}},
           "meta_training": {"algorithm": "anil", "steps": 100, "meta_batch": 4,
                             "train_setting": "5way5shot"},
           "dg": {"zeroshot": {v: {"test_fonts": {"top1": t, "ci95": 0.004}}
                               for v, t in (("pretrained", 0.0125), ("finetune", 0.0170),
                                            ("mldg", 0.0164), ("wise_ft_0.25", 0.014),
                                            ("wise_ft_0.5", 0.0160), ("wise_ft_0.75", 0.0168))},
                  "per_font_count": {"test_fonts": {"STIXGeneral": 1200}},
                  "fewshot": {v: {"zs_head_adapt": {"test_fonts": {"5way5shot": _r(a)}}}
                              for v, a in (("pretrained", 0.30), ("finetune", 0.31),
                                           ("mldg", 0.32), ("wise_ft_0.25", 0.30),
                                           ("wise_ft_0.5", 0.31), ("wise_ft_0.75", 0.31))},
                  "per_font": {"test_fonts": {"pretrained": {"STIXGeneral": 0.01},
                                              "finetune": {"STIXGeneral": 0.02}}}}}
  with open(os.path.join(root, "adapt", "results.json"), "w") as f:
    json.dump(adapt, f)
  conv4 = {"methods": {"conv4_maml": {"test_scripts": {"20way1shot": _r(0.931, 0.004)}},
                       "pixels_protonet_28px": {"test_scripts": {"20way1shot": _r(0.854)}}},
           "meta_training": {"algorithm": "maml", "steps": 300, "train_setting": "20way1shot"}}
  with open(os.path.join(root, "maml_conv4", "results.json"), "w") as f:
    json.dump(conv4, f)


def test_report_and_readme_table_come_from_the_run(tmp_path):
  run = str(tmp_path / "run")
  _fake_run(run)
  readme = str(tmp_path / "README.md")
  with open(readme, "w") as f:
    f.write(f"# title\n\nbefore\n{report.README_BEGIN}\nold numbers 1.0\n{report.README_END}\nafter\n")
  assert report.main(["--run", run, "--wall_time_s", "840", "--readme", readme]) == 0
  text = open(readme).read()
  assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n")
  assert "old numbers" not in text
  table = text.split(report.README_BEGIN)[1].split(report.README_END)[0]
  assert table.strip() == open(os.path.join(run, "results_table.md")).read().strip()
  for expected in ("4.9 ± 0.8", "25.4 ± 0.6", "32.6 ± 0.8", "34.1 ± 0.9", "93.1 ± 0.4",
                   "85.4 ± 1.0", "| mldg | 1.6 ± 0.4 | 32.0 ± 1.0 |", "whole job 14.0 min"):
    assert expected in table, expected
  md = open(os.path.join(run, "report.md")).read()
  assert "93.1 ± 0.4" in md and "Meta-training of the towers: anil, 100 steps" in md
  for png in ("accuracy_vs_shots.png", "accuracy_per_font.png", "wise_ft.png",
              "meta_training.png", "learning_curves.png"):
    assert os.path.getsize(os.path.join(run, png)) > 1000, png
    assert f"]({png})" in md
  # Header: machine, package versions and the latest wall time of each stage.
  assert "Packages: python " in md and "jax " in md and "cores" in md
  assert "stages: prepare 0.7 min, pretrain 4.8 min, adapt 3.3 min" in md


def test_method_colours_are_fixed_and_grouped():
  c = report.method_colours(["zeroshot", "anil", "conv4_maml", "something_new"])
  assert c["zeroshot"] == report.method_colours(["zeroshot"])["zeroshot"]
  assert c["zeroshot"].startswith("#08") and c["conv4_maml"] == "#a50f15"
  assert len({c[m] for m in ("zeroshot", "anil", "conv4_maml", "something_new")}) == 4
  assert report._ordered_methods(["conv4_maml", "zs_head_adapt", "zeroshot"]) == [
      "zeroshot", "zs_head_adapt", "conv4_maml"]


def test_readme_without_markers_is_left_alone(tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("# no markers\n")
  assert not report.update_readme(str(readme), "| a |")
  assert readme.read_text() == "# no markers\n"
