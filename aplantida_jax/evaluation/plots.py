"""PNG figures for eval/report.md: reliability, regional accuracy, confidence, confusions.

Figures are built on `matplotlib.figure.Figure` (Agg canvas, no pyplot global
state), so plotting works headless and from any thread. Each function takes
the plain dicts/arrays that metrics.py and calibration.py return and writes one
PNG atomically (temp file + rename).
"""

import numpy as np
from matplotlib.figure import Figure

from aplantida_jax import fileio

DPI = 110


def _save(fig, path):
  with fileio.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
  return path


def _reliability_panel(ax, bins, title):
  width = np.diff(bins["edges"])
  left = bins["edges"][:-1]
  filled = bins["count"] > 0
  ax.bar(
    left[filled],
    bins["accuracy"][filled],
    width=width[filled],
    align="edge",
    color="tab:blue",
    edgecolor="black",
    label="accuracy in bin",
  )
  gap_bottom = np.minimum(bins["accuracy"], bins["confidence"])[filled]
  gap = np.abs(bins["accuracy"] - bins["confidence"])[filled]
  ax.bar(
    left[filled],
    gap,
    bottom=gap_bottom,
    width=width[filled],
    align="edge",
    color="tab:red",
    alpha=0.35,
    edgecolor="tab:red",
    hatch="//",
    label="|accuracy - confidence|",
  )
  ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
  ax.set(
    xlim=(0, 1),
    ylim=(0, 1),
    title=title,
    xlabel="confidence (max softmax probability)",
    ylabel="accuracy (fraction correct)",
  )
  ax.legend(loc="upper left", fontsize="small")


def reliability_diagram(
  bins_before, bins_after, ece_before, ece_after, temperature, path, split="test"
):
  """Side-by-side reliability diagrams before and after temperature scaling."""
  fig = Figure(figsize=(11, 5))
  before_ax, after_ax = fig.subplots(1, 2)
  _reliability_panel(before_ax, bins_before, f"Before calibration (T = 1): ECE = {ece_before:.3f}")
  _reliability_panel(
    after_ax,
    bins_after,
    f"After temperature scaling (T = {temperature:.3f}): ECE = {ece_after:.3f}",
  )
  fig.suptitle(f"Reliability diagram ({split} split)")
  return _save(fig, path)


def region_accuracy_bars(region_metrics, targets, path, split="test"):
  """Top-1 and top-5 accuracy per region, with the success-criteria top-1 targets marked."""
  names = [name for name, m in region_metrics.items() if m["n"]]
  fig = Figure(figsize=(max(5, 1.8 * len(names) + 2), 4.5))
  ax = fig.subplots()
  x = np.arange(len(names))
  for offset, key, label, color in (
    (-0.2, "top1", "top-1 accuracy", "tab:green"),
    (0.2, "top5", "top-5 accuracy", "tab:olive"),
  ):
    values = [region_metrics[name][key] for name in names]
    bars = ax.bar(x + offset, values, width=0.4, color=color, label=label)
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize="small")
  targeted = [name for name in names if name in targets]
  for name in targeted:
    i = names.index(name)
    ax.hlines(
      targets[name],
      i - 0.4,
      i,
      colors="red",
      linestyles="--",
      label="top-1 target" if name == targeted[0] else None,
    )
  ax.set_xticks(x, [f"{name}\n(n = {region_metrics[name]['n']})" for name in names])
  ax.set(
    ylim=(0, 1.25),
    ylabel="accuracy (fraction correct)",
    title=f"Accuracy per region ({split} split)",
  )
  ax.legend(loc="upper center", ncols=3, fontsize="small")
  return _save(fig, path)


def confidence_histogram(confidence, correct, threshold, path, split="test", n_bins=20):
  """Histogram of calibrated confidences for right and wrong predictions, with the abstain threshold."""
  confidence, correct = np.asarray(confidence), np.asarray(correct, bool)
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  edges = np.linspace(0, 1, n_bins + 1)
  ax.hist(
    [confidence[correct], confidence[~correct]],
    bins=edges,
    stacked=True,
    color=["tab:green", "tab:red"],
    label=["correct", "wrong"],
  )
  ax.axvline(threshold, color="black", linestyle="--", label=f"abstain threshold = {threshold:.3f}")
  ax.set(
    xlim=(0, 1),
    xlabel="calibrated confidence (max softmax probability)",
    ylabel=f"number of {split} images",
    title=f"Confidence of {split} predictions (below threshold = \"unsure\")",
  )
  ax.legend(loc="upper right", fontsize="small")
  return _save(fig, path)


def top_confusions_chart(confusions, path, split="test"):
  """Horizontal bars of the most frequent (true -> predicted) mistakes."""
  fig = Figure(figsize=(8, 0.45 * max(len(confusions), 2) + 1.5))
  ax = fig.subplots()
  if confusions:
    labels = [f"{c['true_species']} -> {c['predicted_species']}" for c in confusions][::-1]
    counts = [c["count"] for c in confusions][::-1]
    bars = ax.barh(np.arange(len(counts)), counts, color="tab:purple")
    ax.bar_label(
      bars,
      labels=[f"{c['count']} ({c['fraction_of_true']:.0%} of true class)" for c in confusions][
        ::-1
      ],
      fontsize="small",
    )
    ax.set_yticks(np.arange(len(counts)), labels)
    ax.set_xlim(0, max(counts) * 1.35)
  else:
    ax.text(0.5, 0.5, "no mistakes on this split", ha="center", va="center", transform=ax.transAxes)
    ax.set_yticks([])
  ax.set(
    xlabel=f"number of {split} images (true species -> predicted species)",
    title=f"Most confused species pairs ({split} split)",
  )
  return _save(fig, path)
