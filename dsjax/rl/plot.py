"""The R1-Zero curves of a GRPO run (reward, accuracy, format, response length, KL, clip fraction vs
step) from its metrics.jsonl, as one PNG. Needs matplotlib (imported here only); without it no PNG is
written (a warning says so) and the curves stay in metrics.jsonl."""
from __future__ import annotations

import io
import json
import warnings

from dsjax.train import workdir_io


def read_metrics(path: str) -> list[dict]:
    """The rows of a metrics.jsonl (a local path or a URL), a torn last line skipped."""
    lines = [line for line in workdir_io.read_text(path).splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines) - 1:
                raise ValueError(f"{path}: line {n + 1} is not JSON") from None
            # else a torn last line (a crash mid-write; the trainer trims it on resume)
    return rows


def plot_grpo(metrics_path: str, out_png: str) -> str | None:
    """Write the curves to out_png and return its path (None, with a warning, if matplotlib is missing)."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn(f"matplotlib is not installed: {out_png} not written (pip install matplotlib); "
                      f"the curves are in {metrics_path}")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)

    def series(key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for key, label in (("reward", "mean reward"), ("accuracy", "train accuracy (sampled)"),
                       ("format", "format rate"), ("eval_accuracy", "held-out accuracy (greedy)")):
        x, y = series(key)
        if x:
            ax.plot(x, y, "o-" if key == "eval_accuracy" else "-", label=label)
    ax.set_xlabel("GRPO step")
    ax.set_title("reward and accuracy")
    ax.legend(fontsize=8)
    ax = axes[1]
    x, y = series("response_length")
    ax.plot(x, y, color="tab:purple")
    ax.set_xlabel("GRPO step")
    ax.set_title("mean response length (tokens)")
    ax = axes[2]
    for key in ("kl", "clip_frac"):
        x, y = series(key)
        ax.plot(x, y, label=key)
    ax.set_xlabel("GRPO step")
    ax.set_title("KL to reference and clip fraction")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    workdir_io.write_atomic(out_png, buf.getvalue())  # (a gs:// workdir too)
    return out_png
