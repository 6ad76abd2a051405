"""Learning rate and batch size, side by side: a small sweep with trainscope's Lightning callback.

    python examples/tune_lr_batch.py [--quick] [--out runs/tune_lr_batch.png]
                                     [--lrs 0.01 0.1 1.0] [--batch-sizes 16 64] [--steps N]
                                     [--tensorboard DIR]

Each run trains a ReLU MLP with SGD on a synthetic classification task generated on the fly
(inputs x ~ N(0, I) labelled by a fixed random teacher network; nothing is downloaded), one short
``Trainer.fit`` per (learning rate, batch size), with :class:`trainscope.lightning.TrainscopeCallback`
measuring the parameter metrics at every step and the per-sample gradient statistics every few
steps. The callback's records reach this script through ``sinks=[...]``; ``--tensorboard DIR``
also logs them to TensorBoard (one version folder per run).

One figure (``--out``, PNG) compares the runs:

- the training loss against the step;
- the update-to-weight ratio ``update_ratio/<weight>`` of each layer's weight matrix (the size of
  the latest optimizer step over the weight's norm, docs/SPEC.md §1) against the step, on a log
  scale, with the rule of thumb 1e-3 marked;
- the gradient noise scale B_simple = tr Σ / ‖G‖² (McCandlish et al. 2018), smoothed as they
  advise: the two parts (``per_sample/grad_variance_trace`` and
  ``per_sample/grad_sq_norm_unbiased``) are each smoothed with an exponential moving average, then
  divided; each run's batch size is drawn beside it as a horizontal line. Where the smoothed
  ‖G‖² is not positive (the noise drowns the mean gradient) the log scale leaves a gap.

A summary table follows on stdout, one row per run: the final loss (mean over the last tenth of
the steps), the median update ratio (over steps and weight matrices) and the smoothed B_simple at
the end. ``--quick`` uses tiny sizes and few steps (well under a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning as L

import trainscope
import trainscope.lightning as tsl

CLASSES = 10
RULE_OF_THUMB = 1e-3
VARIANCE, SIGNAL = "per_sample/grad_variance_trace", "per_sample/grad_sq_norm_unbiased"


@dataclass
class Config:
    lrs: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    batch_sizes: List[int] = field(default_factory=lambda: [16, 64])
    steps: int = 600
    input_dim: int = 32
    width: int = 128
    depth: int = 3
    examples: int = 8192
    per_sample_every: int = 5
    ema: float = 0.9  # weight of the past in the moving averages of B_simple's two parts
    seed: int = 0
    accelerator: str = "cpu"
    out: str = "runs/tune_lr_batch.png"
    tensorboard: Optional[str] = None


QUICK = dict(steps=100, input_dim=16, width=32, depth=2, examples=2048, per_sample_every=2)


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (well under a minute)")
    p.add_argument("--lrs", type=float, nargs="+", help="learning rates (default 0.01 0.1 1.0)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="batch sizes (default 16 64)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 600, --quick 100)")
    p.add_argument("--per-sample-every", type=int, help="steps between per-sample statistics (default 5, --quick 2)")
    p.add_argument("--seed", type=int)
    p.add_argument("--accelerator", help="Lightning accelerator (default cpu)")
    p.add_argument("--out", help="the figure, PNG (default runs/tune_lr_batch.png)")
    p.add_argument("--tensorboard", metavar="DIR", help="also log every run to TensorBoard under DIR")
    a = p.parse_args(argv)
    cfg = Config(**(QUICK if a.quick else {}))
    for name in ("lrs", "batch_sizes", "steps", "per_sample_every", "seed", "accelerator", "out", "tensorboard"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    if any(b < 2 for b in cfg.batch_sizes):
        p.error("--batch-sizes: the per-sample statistics need at least 2 samples per batch")
    return cfg


# -- the task and the model --------------------------------------------------------------------------

def make_data(cfg: Config) -> TensorDataset:
    """x ~ N(0, I), labelled by the argmax of a fixed random tanh teacher."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.examples, cfg.input_dim, generator=g)
    w1 = torch.randn(cfg.input_dim, 64, generator=g) / math.sqrt(cfg.input_dim)
    w2 = torch.randn(64, CLASSES, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return TensorDataset(x, y)


class MLP(L.LightningModule):
    def __init__(self, cfg: Config, lr: float):
        super().__init__()
        layers: List[nn.Module] = []
        d = cfg.input_dim
        for _ in range(cfg.depth):
            layers += [nn.Linear(d, cfg.width), nn.ReLU()]
            d = cfg.width
        layers.append(nn.Linear(d, CLASSES))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        # "losses": the per-sample losses, which the callback records as `loss` (their mean).
        return {"loss": losses.mean(), "losses": losses.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# -- one run -----------------------------------------------------------------------------------------

@dataclass
class Run:
    lr: float
    batch_size: int
    weights: List[str]                       # parameter names of the weight matrices
    records: List = field(default_factory=list)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        return f"lr {self.lr:g}, batch {self.batch_size}"


def train(cfg: Config, data: TensorDataset, lr: float, batch_size: int) -> Run:
    torch.manual_seed(cfg.seed)  # the same initial weights in every run
    model = MLP(cfg, lr)
    run = Run(lr, batch_size, [n for n, p in model.named_parameters() if p.dim() >= 2])
    callback = tsl.TrainscopeCallback(
        param_metrics=trainscope.every(1),                     # loss, update_ratio, ... every step
        grad_hist=False,
        per_sample=trainscope.every(cfg.per_sample_every),     # the parts of B_simple
        sinks=[run.records.append])
    logger = False
    if cfg.tensorboard:
        from lightning.pytorch.loggers import TensorBoardLogger
        logger = TensorBoardLogger(cfg.tensorboard, name=f"lr{lr:g}_batch{batch_size}")
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    trainer = L.Trainer(max_steps=cfg.steps, max_epochs=-1, accelerator=cfg.accelerator, devices=1,
                        callbacks=[callback], logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    run.seconds = time.perf_counter() - t0
    return run


# -- reading the records -----------------------------------------------------------------------------

def series(run: Run, name: str):
    """(steps, values) of one scalar, in step order, over the records that have it."""
    pts = sorted((r.step, float(r.scalars[name])) for r in run.records if name in r.scalars)
    return [s for s, _ in pts], [v for _, v in pts]


def smoothed_noise_scale(run: Run, beta: float):
    """B_simple from exponential moving averages of its two parts: McCandlish et al. (2018,
    appendix A) smooth tr Σ and ‖G‖² separately, then divide, since the ratio of two noisy
    estimates is far noisier than either. Both averages start from 0 with the same weights, so the
    start-up bias (Adam's bias correction) cancels in the ratio."""
    steps, out = [], []
    m_var = m_sig = 0.0
    for r in sorted(run.records, key=lambda r: r.step):
        if VARIANCE not in r.scalars or SIGNAL not in r.scalars:
            continue
        var, sig = float(r.scalars[VARIANCE]), float(r.scalars[SIGNAL])
        if not (math.isfinite(var) and math.isfinite(sig)):
            continue
        m_var = beta * m_var + (1 - beta) * var
        m_sig = beta * m_sig + (1 - beta) * sig
        steps.append(r.step)
        out.append(m_var / m_sig if m_sig != 0 else math.nan)
    return steps, out


def update_ratio_names(run: Run) -> List[str]:
    return [f"update_ratio/{w}" for w in run.weights]


def summarize(cfg: Config, run: Run) -> Dict[str, float]:
    _, loss = series(run, "loss")
    tail = loss[-max(1, len(loss) // 10):]
    ratios = [v for name in update_ratio_names(run) for v in series(run, name)[1] if math.isfinite(v)]
    _, bs = smoothed_noise_scale(run, cfg.ema)
    return {"final_loss": sum(tail) / len(tail) if tail else math.nan,
            "median_update_ratio": statistics.median(ratios) if ratios else math.nan,
            "b_simple_end": bs[-1] if bs else math.nan}


def print_summary(cfg: Config, runs: List[Run]) -> None:
    print(f"{'lr':>8} {'batch':>6} {'final_loss':>11} {'median_update_ratio':>20} {'B_simple_end':>13} {'seconds':>8}")
    for run in runs:
        s = summarize(cfg, run)
        print(f"{run.lr:>8g} {run.batch_size:>6d} {s['final_loss']:>11.4f} {s['median_update_ratio']:>20.3e} "
              f"{s['b_simple_end']:>13.4g} {run.seconds:>8.1f}")
    print(f"final_loss: mean over the last tenth of the steps; median_update_ratio: over steps and weight "
          f"matrices (rule of thumb {RULE_OF_THUMB:g}); B_simple_end: tr Σ / ‖G‖² from moving averages "
          f"(β = {cfg.ema:g}) of the two parts, at the last per-sample step (negative when the smoothed ‖G‖² is: "
          f"the noise drowns the mean gradient)")


# -- the figure --------------------------------------------------------------------------------------

def plot(cfg: Config, runs: List[Run], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("viridis")
    lr_color = {lr: colors(i / max(1, len(cfg.lrs) - 1) * 0.85) for i, lr in enumerate(sorted(cfg.lrs))}
    styles = ["-", "--", ":", "-."]
    batch_style = {b: styles[i % len(styles)] for i, b in enumerate(sorted(cfg.batch_sizes))}
    weights = runs[0].weights

    fig = plt.figure(figsize=(5 * len(weights), 9), layout="constrained")
    grid = fig.add_gridspec(2, 2 * len(weights))
    ax_loss = fig.add_subplot(grid[0, :len(weights)])
    ax_noise = fig.add_subplot(grid[0, len(weights):])
    ax_ratio = [fig.add_subplot(grid[1, 2 * i:2 * i + 2]) for i in range(len(weights))]
    for ax in ax_ratio[1:]:
        ax.sharey(ax_ratio[0])

    for run in runs:
        style = dict(color=lr_color[run.lr], linestyle=batch_style[run.batch_size], linewidth=1.2)
        ax_loss.plot(*series(run, "loss"), label=run.label, **style)
        for ax, name in zip(ax_ratio, update_ratio_names(run)):
            steps, values = series(run, name)
            ax.plot(steps, values, **style)
        steps, bs = smoothed_noise_scale(run, cfg.ema)
        ax_noise.plot(steps, [b if b > 0 else math.nan for b in bs], **style)

    ax_loss.set(title="training loss", xlabel="optimizer step", ylabel="cross-entropy (batch mean)")
    ax_loss.legend(fontsize="small", ncol=2)

    ax_noise.set(title="gradient noise scale B_simple (parts smoothed, then divided)", xlabel="optimizer step",
                 ylabel="B_simple = tr Σ / |G|²", yscale="log")
    for b, ls in batch_style.items():
        ax_noise.axhline(b, color="black", linestyle=ls, linewidth=0.8)
        ax_noise.annotate(f"batch {b}", (1.0, b), xycoords=("axes fraction", "data"), ha="right", va="bottom",
                          fontsize="small")

    for ax, w in zip(ax_ratio, weights):
        ax.set(title=f"update_ratio/{w}", xlabel="optimizer step", yscale="log")
        ax.axhline(RULE_OF_THUMB, color="red", linewidth=0.8)
    ax_ratio[0].set_ylabel("update size / weight norm")
    ax_ratio[0].annotate(f"{RULE_OF_THUMB:g} rule of thumb", (0.0, RULE_OF_THUMB), xycoords=("axes fraction", "data"),
                         color="red", fontsize="small", va="bottom")

    fig.suptitle(f"SGD on an MLP ({cfg.depth} × {cfg.width} ReLU), {cfg.steps} steps per run; "
                 f"colour: learning rate, line style: batch size")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------

def quiet_lightning() -> None:
    # Lightning's start-up messages and its advice on DataLoader workers, once per run, hide the summary.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")


def main(argv=None) -> List[Run]:
    cfg = parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    data = make_data(cfg)
    runs = []
    for batch_size in cfg.batch_sizes:
        for lr in cfg.lrs:
            runs.append(train(cfg, data, lr, batch_size))
    plot(cfg, runs, cfg.out)
    print_summary(cfg, runs)
    print(f"figure: {cfg.out}")
    return runs


if __name__ == "__main__":
    main()
    sys.exit(0)
