"""Run metrics: a JSON-lines log, TensorBoard scalars, and PNG plots at the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class MetricsLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, values: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records the crashed run wrote after its last checkpoint."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What ranks other than 0 log to."""

    def log(self, step: int, values: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_run(run_dir: Path, baseline: float | None = None) -> list[Path]:
    """loss.png (train and per-source validation loss) and expert_load.png (layers x experts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(run_dir)
    train = [r for r in recs if "loss" in r]
    if not train:
        return []
    out = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, alpha=0.7, label="train (mixture)")
    val_keys = sorted({k for r in recs for k in r if k.startswith("val/")})
    for k in val_keys:
        pts = [(r["step"], r[k]) for r in recs if k in r]
        ax.plot(*zip(*pts), marker="o", label=k.replace("val/", "validation: "))
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls="--", lw=1, label=f"unigram entropy {baseline:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"moekit: {run_dir.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=120)
    plt.close(fig)
    out.append(run_dir / "loss.png")

    loads = [r["expert_load"] for r in train[-20:] if r.get("expert_load")]  # dense models log none
    if loads:
        load = np.mean(np.asarray(loads), axis=0)  # [moe layers, experts]
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * load.shape[1], 1.2 + 0.45 * load.shape[0]))
        im = ax.imshow(load, cmap="viridis", aspect="auto")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(load.shape[1]))
        ax.set_yticks(range(load.shape[0]))
        ax.set_title("fraction of routed tokens (last 20 steps)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(run_dir / "expert_load.png", dpi=120)
        plt.close(fig)
        out.append(run_dir / "expert_load.png")
    return out
