"""Figures of a run: loss curves, mAP per epoch, precision–recall, per-cluster bit agreement with masks, throughput.

Plain matplotlib on the Agg canvas, without pyplot: no global figure registry, so figures can be made in any thread
or Ray worker and are freed with their last reference. Each function returns a Figure; `save_png` writes one, and
`brcd_dist.tracking.log_figure` logs one to a run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
ROLE_LABELS = {"sshp": "SSHP (student → student)", "ashp": "ASHP (student → teacher db)", "teacher": "teacher"}


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _xy(series: Any) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) as given, or values alone over steps 0..n-1."""
    if isinstance(series, tuple) and len(series) == 2:
        x, y = (np.asarray(a, dtype=float).ravel() for a in series)
    else:
        y = np.asarray(series, dtype=float).ravel()
        x = np.arange(len(y), dtype=float)
    if len(x) != len(y):
        raise ValueError(f"series has {len(x)} steps but {len(y)} values")
    return x, y


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[: window - 1]) / np.arange(1, window)  # the first points average what exists so far
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def loss_curves(
    series: Mapping[str, Any], *, smooth: int = 1, log_y: bool = False, title: str = "training loss"
) -> Figure:
    """One line per loss term; series[name] = values or (steps, values). smooth > 1 draws a moving average over
    the raw curve (kept faint), since per-step contrastive losses are noisy."""
    fig, ax = _figure()
    for name, s in series.items():
        x, y = _xy(s)
        if smooth > 1:
            (line,) = ax.plot(x, y, alpha=0.25, linewidth=0.8)
            ax.plot(x, _moving_average(y, smooth), color=line.get_color(), label=name, linewidth=1.5)
        else:
            ax.plot(x, y, label=name, linewidth=1.2)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def map_curves(
    epochs: Sequence[int], maps: Mapping[str, Any], *, topk: int | None = None, title: str = "validation mAP"
) -> Figure:
    """mAP per epoch per paradigm (DESIGN §3); a scalar (e.g. the fixed teacher) is drawn as a dashed line."""
    fig, ax = _figure()
    x = np.asarray(epochs, dtype=float)
    for name, values in maps.items():
        label = ROLE_LABELS.get(name, name)
        v = np.asarray(values, dtype=float)
        if v.ndim == 0:
            ax.axhline(float(v), linestyle="--", color="gray", label=f"{label} ({float(v):.3f})")
        else:
            if len(v) != len(x):
                raise ValueError(f"maps[{name!r}] has {len(v)} values for {len(x)} epochs")
            ax.plot(x, v, marker="o", label=label)
    ax.set(xlabel="epoch", ylabel=f"mAP@{topk}" if topk else "mAP", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def pr_curves(curves: Mapping[str, Any], *, title: str = "precision–recall (Hamming radius sweep)") -> Figure:
    """curves[role] = (precision, recall) or retrieval.pr_curve's dict(radius, precision, recall)."""
    fig, ax = _figure(5.0, 4.5)
    for name, c in curves.items():
        precision, recall = (c["precision"], c["recall"]) if isinstance(c, Mapping) else c
        ax.plot(
            np.asarray(recall, dtype=float),
            np.asarray(precision, dtype=float),
            marker=".",
            label=ROLE_LABELS.get(name, name),
        )
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def bit_agreement_heatmap(
    agreement: Any, masks: Any, *, delta: float | None = None, title: str = "per-cluster bit agreement |μ_kb|"
) -> Figure:
    """|μ_kb| (K, L) as a heatmap on [0, 1], with a dot on every bit the mask keeps (m_kb = 1, DESIGN §2)."""
    a, m = np.asarray(agreement, dtype=float), np.asarray(masks)
    if a.ndim != 2 or a.shape != m.shape:
        raise ValueError(f"agreement {a.shape} and masks {m.shape} must both be (K, L)")
    k, bits = a.shape
    fig, ax = _figure(min(16.0, max(6.0, 0.12 * bits + 2.5)), min(12.0, max(3.0, 0.3 * k + 1.5)))
    im = ax.imshow(a, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
    rows, cols = np.nonzero(m > 0)
    ax.scatter(cols, rows, s=9, c="white", edgecolors="black", linewidths=0.4)
    cbar = fig.colorbar(im, ax=ax, label="|μ_kb|")
    if delta is not None:
        cbar.ax.axhline(delta, color="red", linewidth=1.5)  # the threshold: bits at or above it are kept
    kept = f"dots: kept bits ({m.mean():.0%}" + (f" at δ = {delta:g})" if delta is not None else ")")
    ax.set(xlabel="bit b", ylabel="cluster k", title=f"{title}; {kept}")
    if k <= 20:
        ax.set_yticks(range(k))
    return fig


def throughput_bars(
    throughput: Mapping[str, float],
    *,
    unit: str = "img/s",
    baseline: str = "teacher",
    title: str = "inference throughput",
) -> Figure:
    """One bar per model, annotated with its value and its speed-up over `baseline` (or the first bar)."""
    names = list(throughput)
    values = np.asarray([throughput[n] for n in names], dtype=float)
    base = throughput.get(baseline, values[0]) if len(values) else 1.0
    fig, ax = _figure(max(4.0, 1.3 * len(names) + 2.0), 4.0)
    bars = ax.bar(names, values, color=["tab:gray" if n == baseline else "tab:blue" for n in names])
    ax.bar_label(bars, labels=[f"{v:,.0f}\n×{v / base:.2f}" for v in values], padding=2)
    ax.set(ylabel=unit, title=title, ylim=(0, values.max() * 1.25 if len(values) else 1))
    ax.grid(axis="y", alpha=0.3)
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> Path:
    """Write the figure as PNG at its own size and dpi (no tight bbox: the pixel size is figsize × dpi)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path
