"""The license check: may this run's dataset, weights and TF.js export ship?

A model inherits the legal terms of everything that shaped it: the images it
saw, the weights it started from, the teachers whose soft labels it imitated.
So the check walks the workdir the way the data flowed and reports, per input,
pass / fail / not present, plus one violation (file, item, problem, fix) for
every problem it finds:

  dataset_licenses  every shard record's license is allowed by the policy, and
                    the dataset was exported under a shippable policy;
  attributions      every record whose license requires credit has a row in
                    dataset/attributions.csv (matched by sha256) with author and url;
  weights           every training stage started from scratch, from an import
                    folder whose provenance.json names an allowed weight license
                    (Apache-2.0, MIT, BSD-*, CC0-1.0), or from a stage that passes;
                    a distilled student also needs its soft labels to pass;
  soft_labels       every teacher listed in soft_labels/meta.json passes;
  model_card        tfjs/MODEL_CARD.md mentions attributions.csv, and the file beside it
                    is the dataset's (the same bytes, so no credit is stale or missing).

Only the dataset is required; a missing later stage is "not present", not a
failure. The readers of each input are the small `read_*` functions below:
adapt one there if a stage's output contract changes.
"""

import csv
import functools
import glob
import os

from tqdm import tqdm

from aplantida_jax import fileio
from aplantida_jax import stages
from aplantida_jax import workdir as workdir_lib
from aplantida_jax.data import licenses
from aplantida_jax.data import shards

REPORT_FILE = workdir_lib.LICENSE_REPORT
DEFAULT_POLICY = "commercial"
PASS, FAIL, ABSENT = "pass", "fail", "not present"
CHECKS = ("dataset_licenses", "attributions", "weights", "soft_labels", "model_card")
WEIGHT_LICENSES = "Apache-2.0, MIT, BSD-*, CC0-1.0"
ATTRIBUTIONS_FILE = "attributions.csv"
SOFT_LABELS_DIR = "soft_labels"
TFJS_DIR = workdir_lib.TFJS
MODEL_CARD = "MODEL_CARD.md"
RERUN_EXPORT = "re-run the export stage (configs/export.py)"


# ---------------------------------------------------------------- readers
# One per input contract; each returns None (or an empty result) when the input is absent.


def read_export_policy(dataset_manifest: dict):
  """The policy the dataset was exported under (manifest `license_policy`, else its config)."""
  return dataset_manifest.get("license_policy") or (
    dataset_manifest.get("config", {}).get("licenses", {}).get("policy")
  )


def iter_shard_records(dataset_dir: str):
  """(file, record) for every record of every split on disk (shards.split_records)."""
  for split in tqdm(
    shards.split_names(dataset_dir), desc="license check", unit="split", disable=None
  ):
    yield from shards.split_records(dataset_dir, split)


def read_attributions(path: str):
  """{sha256: row} of dataset/attributions.csv (columns sha256,species,author,license,source,url)."""
  if not os.path.exists(path):
    return None
  with open(path, newline="") as f:
    return {row["sha256"]: row for row in csv.DictReader(f)}


def find_training_stages(workdir: str) -> list:
  """Stage folders (relative, depth 1 or 2) whose config.json is a training config."""
  found = []
  for path in sorted(
    glob.glob(os.path.join(workdir, "*", "config.json"))
    + glob.glob(os.path.join(workdir, "*", "*", "config.json"))
  ):
    config = fileio.read_json(path)
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
      found.append(os.path.relpath(os.path.dirname(path), workdir).replace(os.sep, "/"))
  return found


def recorded_training_stages(workdir: str) -> list:
  """Training stage folders the runner's manifest.json records (so a deleted one is reported)."""
  manifest = fileio.read_json(workdir_lib.Workdir(workdir).manifest) or {}
  recorded = {
    name: record.get("config") or {} for name, record in (manifest.get("stages") or {}).items()
  }
  return stages.trained_outputs(recorded, workdir)


def read_weight_sources(stage_config: dict) -> list:
  """Where a stage's weights came from, as the train loop decides it.

  The loop (train/loop.py) starts from `init_from_stage` when set, else from the
  import folder `model.init_from`, else from scratch. A distillation stage also
  learns from its teachers: through the soft labels it reads
  (`distill.soft_labels_dir`), or, with `distill.mode="online"`, directly from
  the stage folders `distill.teachers.<name>.dir`.
  → list of ("stage" | "import" | "soft_labels" | "teacher", folder).
  """
  sources = []
  if stage_config.get("init_from_stage"):
    sources.append(("stage", stage_config["init_from_stage"]))
  elif stage_config["model"].get("init_from"):
    sources.append(("import", stage_config["model"]["init_from"]))
  if stage_config.get("stage") == "distill":
    distill = stage_config.get("distill") or {}
    if distill.get("mode") == "online":
      sources += [
        ("teacher", t["dir"]) for t in (distill.get("teachers") or {}).values() if t.get("dir")
      ]
    else:
      sources.append(("soft_labels", distill.get("soft_labels_dir") or SOFT_LABELS_DIR))
  return sources


def read_provenance(import_dir: str):
  """provenance.json written by tools/import_pretrained.py, or None."""
  return fileio.read_json(os.path.join(import_dir, "provenance.json"))


def describe_provenance(provenance: dict) -> str:
  package = (
    provenance.get("package")
    or provenance.get("source_package")
    or provenance.get("source")
    or "unknown package"
  )  # PyPI package, or a Keras file
  version = (
    provenance.get("version")
    or provenance.get("source_version")
    or f"sha256 {provenance.get('weight_sha256', '?')[:12]}"
  )
  return f"{package} {version} ({provenance.get('license') or 'no license recorded'})"


def read_soft_label_teachers(meta: dict):
  """Teacher stage folders listed in soft_labels/meta.json `teachers[].dir`, or None."""
  teachers = meta.get("teachers")
  if not isinstance(teachers, list):
    return None
  return [t["dir"] if isinstance(t, dict) else t for t in teachers]


# ---------------------------------------------------------------- checks


def violation(check, file, item, problem, fix) -> dict:
  return {"check": check, "file": file, "item": item, "problem": problem, "fix": fix}


def _status(violations, check) -> str:
  return FAIL if any(v["check"] == check for v in violations) else PASS


def _record_item(record) -> str:
  return f"sha256={record.get('sha256')} url={record.get('url')}"


def attribution_problems(record, row) -> list:
  """What is wrong with a credit-requiring record's attributions.csv row (none when fine)."""
  if row is None:
    return ["no row in attributions.csv"]
  problems = [
    f"row has empty {field}" for field in ("author", "url") if not (row.get(field) or "").strip()
  ]
  if licenses.normalize(row.get("license")) != record["license"]:
    problems.append(
      f"row says license {row.get('license')!r}, the shard says {record['license']!r}"
    )
  return problems


def check_dataset(workdir: str, policy) -> tuple:
  """Checks 1 and 2 in one pass over the shards → ({check: result}, violations)."""
  dataset_dir = workdir_lib.Workdir(workdir).dataset
  manifest_path = os.path.join(dataset_dir, "manifest.json")
  attributions_path = os.path.join(dataset_dir, ATTRIBUTIONS_FILE)
  rel = functools.partial(os.path.relpath, start=workdir)
  manifest = fileio.read_json(manifest_path)
  if manifest is None:
    return (
      {
        "dataset_licenses": {"status": FAIL, "detail": "dataset/manifest.json missing"},
        "attributions": {"status": FAIL, "detail": "no dataset"},
      },
      [
        violation(
          "dataset_licenses",
          rel(manifest_path),
          "dataset",
          "no complete export (the manifest is written last)",
          RERUN_EXPORT,
        )
      ],
    )
  # The sidecars stand in for the shards only while every shard is the one exported.
  found = [
    violation(
      "dataset_licenses",
      rel(os.path.join(dataset_dir, shard["file"])),
      "shard",
      "differs from the sha256 dataset/manifest.json recorded (changed after the export)",
      RERUN_EXPORT,
    )
    for info in (manifest.get("shards") or {}).values()
    for shard in info
    if not os.path.exists(os.path.join(dataset_dir, shard["file"]))
    or fileio.sha256_file(os.path.join(dataset_dir, shard["file"])) != shard["sha256"]
  ]
  export_policy = read_export_policy(manifest)
  if export_policy is not None and not getattr(
    licenses.POLICIES.get(export_policy), "shippable", False
  ):
    found.append(
      violation(
        "dataset_licenses",
        rel(manifest_path),
        f"licenses.policy={export_policy}",
        f"the dataset was exported under policy {export_policy!r}, which is not shippable",
        "re-export with --config.licenses.policy=commercial and retrain",
      )
    )
  attributions = read_attributions(attributions_path)
  if attributions is None:
    found.append(
      violation(
        "attributions", rel(attributions_path), "dataset", "attributions.csv missing", RERUN_EXPORT
      )
    )
  by_license, records, credited, uncredited = {}, 0, 0, 0
  for path, record in iter_shard_records(dataset_dir):
    records += 1
    spdx = record["license"] = licenses.normalize(record.get("license"))
    by_license[spdx] = by_license.get(spdx, 0) + 1
    allowed, reason = policy.check(spdx)
    if not allowed:
      found.append(
        violation(
          "dataset_licenses",
          rel(path),
          _record_item(record),
          f"license {spdx}: {reason}",
          f"drop the image from the catalog (or fix its license) and {RERUN_EXPORT} "
          f"with licenses.policy={policy.name}",
        )
      )
    if attributions is None or not licenses.requires_attribution(spdx):
      continue
    problems = attribution_problems(record, attributions.get(record.get("sha256")))
    credited += not problems
    uncredited += bool(problems)
    if problems:
      found.append(
        violation(
          "attributions",
          rel(attributions_path),
          _record_item(record),
          f"{spdx} requires attribution: {'; '.join(problems)}",
          f"record author and url for the image in the catalog and {RERUN_EXPORT}",
        )
      )
  if not records:
    found.append(
      violation(
        "dataset_licenses",
        rel(os.path.join(dataset_dir, "splits")),
        "dataset",
        "no shard records",
        RERUN_EXPORT,
      )
    )
  results = {
    "dataset_licenses": {
      "status": _status(found, "dataset_licenses"),
      "records": records,
      "export_policy": export_policy,
      "by_license": dict(sorted(by_license.items())),
    },
    "attributions": {
      "status": _status(found, "attributions"),
      "credited": credited,
      "uncredited": uncredited,
    },
  }
  return results, found


class StageJudge:
  """Verdicts on where each stage's weights came from; stages inherit their sources' verdicts."""

  def __init__(self, workdir):
    self.workdir = workdir
    self.verdicts = {}

  def stage(self, name: str, _visiting=()) -> dict:
    """{"status", "sources", ["problem", "fix", "file"]} for the stage folder `name`."""
    if name in self.verdicts:
      return self.verdicts[name]
    if name in _visiting:
      return {
        "status": FAIL,
        "sources": [],
        "file": f"{name}/config.json",
        "problem": f"stages start from each other in a cycle: {' → '.join(_visiting + (name,))}",
        "fix": "fix init_from_stage in the stage configs",
      }
    stage_dir = os.path.join(self.workdir, name)
    config = fileio.read_json(os.path.join(stage_dir, "config.json"))
    if not os.path.isdir(stage_dir):
      verdict = {"status": ABSENT, "sources": []}
    elif not isinstance(config, dict) or not isinstance(config.get("model"), dict):
      verdict = {
        "status": FAIL,
        "sources": [],
        "file": f"{name}/config.json",
        "problem": "no training config.json: where its weights came from is unknown",
        "fix": f"re-run the stage that writes {name}/ (the train loop writes config.json)",
      }
    else:
      verdict = self._judge_sources(name, read_weight_sources(config), _visiting + (name,))
    self.verdicts[name] = verdict
    return verdict

  def _judge_sources(self, name, sources, visiting) -> dict:
    described, problems = [], []
    judges = {
      "stage": self._stage,
      "import": self._import,
      "soft_labels": self._soft_labels,
      "teacher": functools.partial(self._stage, relation="learns online from teacher"),
    }
    for kind, ref in sources:
      text, problem = judges[kind](ref, visiting)
      described.append(text)
      if problem:
        problems.append(problem)
    verdict = {"status": FAIL if problems else PASS, "sources": described or ["scratch"]}
    if problems:
      verdict.update(
        file=f"{name}/config.json",
        problem="; ".join(p for p, _ in problems),
        fix="; ".join(dict.fromkeys(f for _, f in problems)),
      )
    return verdict

  def _stage(self, ref, visiting, relation="starts from stage"):
    parent, text = self.stage(ref, visiting), f"{relation.split()[-1]} {ref}"
    if parent["status"] == PASS:
      return text, None
    if parent["status"] == ABSENT:
      return text, (
        f"{relation} {ref}, which is not in the workdir",
        f"run stage {ref} first, or point the config at a stage that exists",
      )
    return text, (f"{relation} {ref}, which fails: {parent['problem']}", parent["fix"])

  def _import(self, ref, _):
    path = (
      ref
      if os.path.isabs(ref)
      else next(
        (p for p in (os.path.abspath(ref), os.path.join(self.workdir, ref)) if os.path.isdir(p)),
        os.path.abspath(ref),
      )
    )
    retrain = (
      "import permissively licensed weights (tools/import_pretrained.py --out DIR) and "
      "retrain from them, or retrain from scratch with model.init_from=''"
    )
    if not os.path.isdir(path):
      return f"import {ref}", (
        f"model.init_from={ref} is not found, so its license cannot be verified",
        f"restore that import folder, or {retrain}",
      )
    provenance = read_provenance(path)
    if provenance is None:
      return f"import {ref}", (
        f"import folder {ref} has no provenance.json: weights of unknown license",
        retrain,
      )
    text = f"import {ref}: {describe_provenance(provenance)}"
    if not licenses.weights_license_allowed(provenance.get("license")):
      return text, (
        f"pretrained weights in {ref} are licensed {provenance.get('license')!r}, "
        f"not one of {WEIGHT_LICENSES}",
        retrain,
      )
    return text, None

  def _soft_labels(self, ref, _):
    verdict = self.soft_labels(ref)
    if verdict["status"] == PASS:
      return f"soft labels {ref}", None
    return f"soft labels {ref}", (
      f"learns from soft labels {ref}, which "
      f"{'are not in the workdir' if verdict['status'] == ABSENT else 'fail'}",
      f"fix {ref} (see the soft_labels check) and re-run distillation",
    )

  def soft_labels(self, folder=SOFT_LABELS_DIR) -> dict:
    """{"status", "teachers": {dir: status}, ["problem", "fix", "file"]} of a soft-label folder."""
    if not os.path.isdir(os.path.join(self.workdir, folder)):
      return {"status": ABSENT, "teachers": {}}
    meta_file = f"{folder}/meta.json"
    teachers = read_soft_label_teachers(
      fileio.read_json(os.path.join(self.workdir, meta_file)) or {}
    )
    if teachers is None:
      return {
        "status": FAIL,
        "teachers": {},
        "file": meta_file,
        "problem": "meta.json is missing or does not list the teachers (key 'teachers'): "
        "their licenses cannot be checked",
        "fix": "re-run the soft_labels stage",
      }
    statuses = {t: self.stage(t)["status"] for t in teachers}
    failing = [t for t, s in statuses.items() if s != PASS]
    if not failing:
      return {"status": PASS, "teachers": statuses}
    return {
      "status": FAIL,
      "teachers": statuses,
      "file": meta_file,
      "problem": "soft labels come from teachers whose weights do not pass: "
      + ", ".join(f"{t} ({statuses[t]})" for t in failing),
      "fix": "fix those teachers (see the weights check), then re-run soft_labels and the "
      "student stages",
    }


def check_weights(workdir: str, judge: StageJudge) -> tuple:
  """Check 3 over every training stage → (result, violations)."""
  names = find_training_stages(workdir)
  names += [n for n in recorded_training_stages(workdir) if n not in names]
  verdicts = {name: judge.stage(name) for name in names}
  found = [
    violation("weights", v["file"], f"stage {name}", v["problem"], v["fix"])
    for name, v in verdicts.items()
    if v["status"] == FAIL
  ]
  present = any(v["status"] != ABSENT for v in verdicts.values())
  status = FAIL if found else PASS if present else ABSENT
  return {"status": status, "stages": verdicts}, found


def check_soft_labels(judge: StageJudge) -> tuple:
  """Check 4 → (result, violations)."""
  verdict = judge.soft_labels()
  found = []
  if verdict["status"] == FAIL:
    found.append(
      violation("soft_labels", verdict["file"], SOFT_LABELS_DIR, verdict["problem"], verdict["fix"])
    )
  return {k: verdict[k] for k in ("status", "teachers")}, found


def check_model_card(workdir: str) -> tuple:
  """Check 5: the shipped model credits its images → (result, violations)."""
  tfjs_dir = os.path.join(workdir, TFJS_DIR)
  if not os.path.isdir(tfjs_dir):
    return {"status": ABSENT}, []
  card = os.path.join(tfjs_dir, MODEL_CARD)
  fix = "re-run the export_tfjs stage (configs/export_tfjs.py), which writes both"
  found = []
  if not os.path.exists(card):
    found.append(violation("model_card", f"{TFJS_DIR}/{MODEL_CARD}", "model card", "missing", fix))
  else:
    with open(card, encoding="utf-8") as f:
      if ATTRIBUTIONS_FILE not in f.read():
        found.append(
          violation(
            "model_card",
            f"{TFJS_DIR}/{MODEL_CARD}",
            "attribution pointer",
            f"does not point at {ATTRIBUTIONS_FILE}",
            fix,
          )
        )
  shipped = os.path.join(tfjs_dir, ATTRIBUTIONS_FILE)
  dataset_copy = os.path.join(workdir_lib.Workdir(workdir).dataset, ATTRIBUTIONS_FILE)
  if not os.path.exists(shipped):
    found.append(
      violation(
        "model_card",
        f"{TFJS_DIR}/{ATTRIBUTIONS_FILE}",
        "attributions",
        "missing from the export",
        fix,
      )
    )
  elif os.path.exists(dataset_copy) and fileio.sha256_file(shipped) != fileio.sha256_file(
    dataset_copy
  ):
    found.append(
      violation(
        "model_card",
        f"{TFJS_DIR}/{ATTRIBUTIONS_FILE}",
        "attributions",
        f"differs from dataset/{ATTRIBUTIONS_FILE}: the export credits another dataset version",
        fix,
      )
    )
  detail = "; ".join(f"{v['file']} {v['problem']}" for v in found) or (
    f"{MODEL_CARD} points at {ATTRIBUTIONS_FILE}, which ships beside it"
  )
  return {"status": FAIL if found else PASS, "detail": detail}, found


def check(workdir: str, policy_name=None) -> dict:
  """Runs every check on `workdir` → the report (see module docstring)."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise FileNotFoundError(
      f"workdir {workdir} does not exist; pass the --workdir of a pipeline run."
    )
  policy = licenses.get_policy(policy_name or DEFAULT_POLICY)
  results, found = check_dataset(workdir, policy)
  if not policy.shippable:
    found.insert(
      0,
      violation(
        "dataset_licenses",
        "(check policy)",
        f"policy={policy.name}",
        f"policy {policy.name!r} is for research only: nothing under it ships",
        "check (and export) with the commercial policy",
      ),
    )
    results["dataset_licenses"]["status"] = FAIL
  judge = StageJudge(workdir)
  for name, (result, violations) in (
    ("weights", check_weights(workdir, judge)),
    ("soft_labels", check_soft_labels(judge)),
    ("model_card", check_model_card(workdir)),
  ):
    results[name] = result
    found += violations
  return {
    "passed": not found,
    "policy": policy.name,
    "workdir": workdir,
    "checks": {name: results[name] for name in CHECKS},
    "violations": found,
  }


def write_report(workdir: str, report: dict) -> str:
  """Atomic write of <workdir>/license_report.json; returns its path."""
  path = os.path.join(workdir, REPORT_FILE)
  fileio.write_json(path, report)
  return path


def _detail(name, result) -> str:
  if name == "dataset_licenses" and "records" in result:
    licenses_seen = ", ".join(f"{k} {v}" for k, v in result["by_license"].items())
    return f"{result['records']} records, exported under {result['export_policy']}: {licenses_seen}"
  if name == "attributions" and "credited" in result:
    return f"{result['credited']} credited, {result['uncredited']} not"
  if name == "weights":
    return "; ".join(
      f"{s}: {v['status']}" + (f" ({', '.join(v['sources'])})" if v["sources"] else "")
      for s, v in result["stages"].items()
    )
  if name == "soft_labels":
    return ", ".join(f"{t}: {s}" for t, s in result["teachers"].items())
  return result.get("detail", "")


def format_report(report: dict, max_violations: int = 50) -> str:
  """A readable table of the checks, then the violations with their fixes."""
  lines = [
    f"license check of {report['workdir']} (policy {report['policy']}): "
    f"{'PASS' if report['passed'] else 'FAIL'}",
    "",
    f"{'check':<18} {'status':<12} detail",
  ]
  for name, result in report["checks"].items():
    lines.append(f"{name:<18} {result['status']:<12} {_detail(name, result)}")
  violations = report["violations"]
  if violations:
    lines += ["", f"{len(violations)} violation(s):"]
    for v in violations[:max_violations]:
      lines.append(
        f"  [{v['check']}] {v['file']} — {v['item']}: {v['problem']}\n      fix: {v['fix']}"
      )
    if len(violations) > max_violations:
      lines.append(f"  ... and {len(violations) - max_violations} more in {REPORT_FILE}")
  return "\n".join(lines)


def run(config, workdir: str) -> dict:
  """Stage "license_check": writes <workdir>/license_report.json; exits non-zero on any violation."""
  report = check(workdir, config.licenses.policy)
  path = write_report(workdir, report)
  text = format_report(report)
  if not report["passed"]:
    raise SystemExit(f"{text}\n\nlicense check FAILED; full report: {path}")
  print(text)
  return {
    "metric": f"license check pass ({report['checks']['dataset_licenses']['records']} records)",
    "report": path,
  }
