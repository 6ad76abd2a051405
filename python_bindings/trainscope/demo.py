"""``make demo``: loss of plasticity as it happens (Dohare et al., Nature 2024), with every
trainscope metric recorded along the way.

    python -m trainscope.demo [--tasks 40] [--steps-per-task 300] [--width 128] [--depth 3]
                              [--activation relu|tanh|sigmoid] [--seed 0] [--device cpu|cuda]
                              [--out runs/demo] [--compare shrink_perturb|l2] [--tiny]

The problem is an online sequence of permuted synthetic classification tasks, generated on the
fly: inputs x ~ N(0, I₃₂) labelled by a fixed random teacher network; task t shows the network
the inputs with their coordinates permuted by its own permutation, so each task is as hard as the
first. A ReLU MLP is trained by plain backprop (SGD), one fresh batch per step. As tasks go by its
representation collapses — effective rank falls, dead units rise — its weights grow, and its
error on each new task stops improving.

Everything is measured through a :class:`trainscope.Monitor`, without host synchronisation in the
training step: parameter metrics every step, the gradient histogram and the per-sample gradient
statistics and histograms (1-D, and 2-D against the parameter values) on a schedule, and the representation metrics of every hidden layer at each task start
on a 2,000-example probe set. Outputs in ``--out``: TensorBoard event files, ``metrics.csv`` (one
row per logged step, one column per scalar) and ``dashboard.png``. ``--compare`` trains a second
network with a mitigation (shrink-and-perturb or L2) beside plain backprop: each run then writes
to its own folder and the dashboard shows both.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

import trainscope
from trainscope import at_steps, every

INPUT_DIM = 32
CLASSES = 10
PROBE_EXAMPLES = 2000
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
# Bin edges of the per-sample histograms (SPEC.md §2, §4 defaults), host values for the Monitor.
PS_HIST_EDGES = trainscope.hist_bin_edges(100, 0.05)
PS_HIST2D_EDGES = trainscope.hist2d_bin_edges(100, 0.05, 100, 1.0)


@dataclass
class Config:
    tasks: int = 40
    steps_per_task: int = 300
    width: int = 128
    depth: int = 3
    activation: str = "relu"
    lr: float = 0.1
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/demo"
    compare: Optional[str] = None  # "shrink_perturb" or "l2"
    hist_every: int = 50
    per_sample_every: int = 100
    progress: bool = True


# -- the continual-learning problem ----------------------------------------------------------------

class PermutedTasks:
    """Online permuted synthetic classification: one fixed teacher, one input permutation per task."""

    def __init__(self, tasks: int, seed: int, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.teacher = nn.Sequential(nn.Linear(INPUT_DIM, 64), nn.Tanh(), nn.Linear(64, CLASSES)).to(device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.perms = [torch.randperm(INPUT_DIM, generator=self.gen).to(device) for _ in range(tasks)]
        self.probe_x = torch.randn(PROBE_EXAMPLES, INPUT_DIM, generator=self.gen).to(device)
        self.device = device

    def batch(self, task: int, size: int):
        x = torch.randn(size, INPUT_DIM, generator=self.gen).to(self.device)
        with torch.no_grad():
            y = self.teacher(x).argmax(1)
        return x[:, self.perms[task]], y

    def probe(self, task: int) -> torch.Tensor:
        return self.probe_x[:, self.perms[task]]


def build_model(cfg: Config) -> nn.Sequential:
    layers: List[nn.Module] = []
    d = INPUT_DIM
    for _ in range(cfg.depth):
        layers += [nn.Linear(d, cfg.width), ACTIVATIONS[cfg.activation]()]
        d = cfg.width
    layers.append(nn.Linear(d, CLASSES))
    return nn.Sequential(*layers)


# -- quantities the loop hands to the Monitor ---------------------------------------------------------

class FromExtras(trainscope.Quantity):
    """A quantity computed in the training loop and handed over through ``mon.step(..., **extras)``:
    it logs ``ctx.extras[key]`` (a dict of 0-d device tensors) under ``<key>/<name>``."""

    def __init__(self, key: str):
        self.key = key

    def compute(self, ctx):
        return ctx.extras[self.key]


def shrink_and_perturb(model: nn.Module, shrink: float, noise: float) -> None:
    """θ ← (1 − shrink)·θ + noise·ε after each step (Ash & Adams 2020), keeping units alive."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 - shrink).add_(torch.randn_like(p), alpha=noise)


# -- one run -------------------------------------------------------------------------------------

@dataclass
class RunResult:
    label: str
    out_dir: str
    records: List[trainscope.StepRecord] = field(default_factory=list)
    seconds: float = 0.0


def train(cfg: Config, problem: PermutedTasks, label: str, out_dir: str, mitigation: Optional[str]) -> RunResult:
    device = problem.device
    torch.manual_seed(cfg.seed + 1)
    model = build_model(cfg).to(device)
    weight_decay = 1e-3 if mitigation == "l2" else 0.0
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=weight_decay)
    os.makedirs(out_dir, exist_ok=True)
    result = RunResult(label, out_dir)
    tb = trainscope.TensorBoardSink(out_dir)
    total = cfg.tasks * cfg.steps_per_task
    task_starts = [t * cfg.steps_per_task for t in range(cfg.tasks)]
    bar = _progress(total, label, cfg.progress)

    def collect(rec):
        result.records.append(rec)
        bar.note(rec)

    # Everything the Monitor computes runs on the device; records reach the sinks a step later.
    mon = trainscope.Monitor(model, param_metrics=every(1), grad_hist=every(cfg.hist_every),
                             sinks=[collect, tb])
    mon.add_quantity(FromExtras("train"), every(1))
    mon.add_quantity(FromExtras("per_sample"), every(cfg.per_sample_every))
    mon.add_quantity(FromExtras("representation"), at_steps(task_starts))
    probe_layers = [name for name, m in model.named_modules() if isinstance(m, tuple(ACTIVATIONS.values()))]

    t0 = time.perf_counter()
    with mon:
        for step in range(total):
            task = step // cfg.steps_per_task
            extras: Dict[str, Dict[str, torch.Tensor]] = {}
            if step % cfg.steps_per_task == 0:  # a task starts: its probe set through the current network
                probe = trainscope.RepresentationProbe(model, problem.probe(task), layers=probe_layers,
                                                       batch_size=500)
                extras["representation"] = probe().scalars()
            x, y = problem.batch(task, cfg.batch_size)
            per_sample = mon.due("per_sample", step)
            with (trainscope.PerSampleHooks(model, loss_reduction="mean") if per_sample
                  else contextlib.nullcontext()) as hooks:
                out = model(x)
                losses = nn.functional.cross_entropy(out, y, reduction="none")
                opt.zero_grad(set_to_none=True)
                losses.mean().backward()
                histograms = {}
                if hooks is not None:
                    extras["per_sample"] = hooks.stats().as_dict()
                    histograms = {"per_sample/grad_hist1d": (hooks.grad_hist1d(), PS_HIST_EDGES),
                                  "per_sample/grad_hist2d": (hooks.grad_hist2d()[0], PS_HIST2D_EDGES)}
            opt.step()
            if mitigation == "shrink_perturb":
                shrink_and_perturb(model, shrink=1e-4, noise=1e-3)
            extras["train"] = {"error": (out.detach().argmax(1) != y).float().mean()}
            mon.step(step, losses.detach(), histograms=histograms, **extras)
            bar.update()
    result.seconds = time.perf_counter() - t0
    bar.close()
    tb.close()
    write_metrics_csv(result.records, os.path.join(out_dir, "metrics.csv"))
    return result


# -- outputs ---------------------------------------------------------------------------------------

def write_metrics_csv(records: List[trainscope.StepRecord], path: str) -> None:
    """One row per logged step, one column per scalar name (empty where a step did not log it)."""
    names: List[str] = []
    seen = set()
    for rec in records:
        for n in rec.scalars:
            if n not in seen:
                seen.add(n)
                names.append(n)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step"] + names)
        for rec in records:
            w.writerow([rec.step] + [_fmt(rec.scalars.get(n)) for n in names])


def _fmt(v: Optional[float]) -> str:
    return "" if v is None else repr(float(v))


def series(records: List[trainscope.StepRecord], name: str):
    xs = [r.step for r in records if name in r.scalars]
    ys = [r.scalars[name] for r in records if name in r.scalars]
    return xs, ys


def task_summary(cfg: Config, records: List[trainscope.StepRecord]) -> List[Dict[str, float]]:
    """Per task: online error over the last quarter of its steps, and the representation metrics
    and weight magnitude measured at its start."""
    rows = []
    by_step = {r.step: r.scalars for r in records}
    for t in range(cfg.tasks):
        start = t * cfg.steps_per_task
        tail = range(start + cfg.steps_per_task * 3 // 4, start + cfg.steps_per_task)
        errs = [by_step[s]["train/error"] for s in tail if s in by_step and "train/error" in by_step[s]]
        first = by_step.get(start, {})
        rows.append({
            "task": t,
            "error": sum(errs) / len(errs) if errs else math.nan,
            "effective_rank": first.get("representation/effective_rank", math.nan),
            "dead_fraction": first.get("representation/dead_fraction", math.nan),
            "weight_magnitude": first.get("weight_magnitude", math.nan),
        })
    return rows


PANELS = [
    ("train/error", "online error, last quarter of each task"),
    ("representation/effective_rank", "effective rank (mean over hidden layers)"),
    ("representation/dead_fraction", "dead units (fraction of hidden units)"),
    ("weight_magnitude", "weight magnitude"),
    ("grad_norm", "gradient norm (smoothed)"),
    ("update_size", "update size (smoothed)"),
    ("distance", "distance from initialisation"),
    ("per_sample/gradient_noise_scale", "gradient noise scale B_simple (median per task)"),
]


PER_TASK_PANELS = ("train/error", "per_sample/gradient_noise_scale")


def _per_task_median(cfg: Config, xs: List[int], ys: List[float]):
    by_task: Dict[int, List[float]] = {}
    for x, y in zip(xs, ys):
        by_task.setdefault(x // cfg.steps_per_task, []).append(y)
    tasks = sorted(by_task)
    return ([(t + 1) * cfg.steps_per_task for t in tasks],
            [sorted(by_task[t])[len(by_task[t]) // 2] for t in tasks])


def _smooth(ys: List[float], window: int) -> List[float]:
    if window <= 1 or len(ys) < window:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_dashboard(cfg: Config, runs: List[RunResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(25, 8.5), constrained_layout=True)
    window = max(1, cfg.steps_per_task // 4)
    panel_axes = [axes[r, c] for r in range(2) for c in range(4)]  # column 4: the histograms
    for ax, (name, title) in zip(panel_axes, PANELS):
        for run in runs:
            xs, ys = series(run.records, name)
            if name == "train/error":  # per task: the level each task's learning reaches
                rows = task_summary(cfg, run.records)
                xs = [(r["task"] + 1) * cfg.steps_per_task for r in rows]
                ys = [r["error"] for r in rows]
            elif name == "per_sample/gradient_noise_scale":  # noisy per batch: a robust per-task level
                xs, ys = _per_task_median(cfg, xs, ys)
            elif name in ("grad_norm", "update_size"):
                ys = _smooth(ys, window)
            marker = "o" if name.startswith("representation/") or name in PER_TASK_PANELS else None
            ax.plot(xs, ys, label=run.label, marker=marker, markersize=3, linewidth=1.2)
        for t in range(1, cfg.tasks):
            ax.axvline(t * cfg.steps_per_task, color="0.85", linewidth=0.5, zorder=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if len(runs) > 1:
            ax.legend(fontsize=8)
    plot_per_sample_histograms(axes[0, 4], axes[1, 4], runs[0])
    fig.suptitle(f"trainscope: loss of plasticity over {cfg.tasks} permuted tasks "
                 f"({cfg.depth}×{cfg.width} {cfg.activation} MLP, SGD lr {cfg.lr}); grey lines: task boundaries")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_sample_histograms(ax1, ax2, run: RunResult) -> None:
    """The per-sample gradient histogram at the first and last step it was taken, and the last
    (gradient, parameter value) 2-D histogram, of one run."""
    import numpy as np

    taken = [r for r in run.records if "per_sample/grad_hist1d" in r.histograms]
    if not taken:
        return
    for rec, style in ((taken[0], "-"), (taken[-1], "--")):
        edges, counts = rec.histograms["per_sample/grad_hist1d"]
        centres = ((edges[:-1] + edges[1:]) / 2).numpy()
        ax1.semilogy(centres, np.maximum(counts.numpy(), 0.5), style, label=f"step {rec.step}")
    ax1.set_title(f"per-sample gradients ({run.label})", fontsize=10)
    ax1.set_xlabel("gradient element")
    ax1.legend(fontsize=8)
    (g_edges, p_edges), counts2 = taken[-1].histograms["per_sample/grad_hist2d"]
    ax2.imshow(np.log10(1 + counts2.numpy()), origin="lower", aspect="auto", cmap="viridis",
               extent=(float(p_edges[0]), float(p_edges[-1]), float(g_edges[0]), float(g_edges[-1])))
    ax2.set_title(f"log10(1 + count), step {taken[-1].step}: gradient × parameter", fontsize=10)
    ax2.set_xlabel("parameter value")
    ax2.set_ylabel("per-sample gradient element")


def print_summary(cfg: Config, runs: List[RunResult]) -> None:
    for run in runs:
        rows = task_summary(cfg, run.records)
        print(f"\n{run.label}: {cfg.tasks} tasks × {cfg.steps_per_task} steps in {run.seconds:.1f} s")
        print(f"{'task':>5} {'error':>7} {'eff. rank':>10} {'dead %':>7} {'weight mag':>11}")
        every_tenth = range(0, cfg.tasks, max(1, cfg.tasks // 10))
        shown = sorted(t for t in set([0, 1, 2, cfg.tasks - 1, *every_tenth]) if t < cfg.tasks)
        for t in shown:
            r = rows[t]
            print(f"{r['task']:>5} {r['error']:>7.3f} {r['effective_rank']:>10.2f} "
                  f"{100 * r['dead_fraction']:>7.1f} {r['weight_magnitude']:>11.4f}")


class _progress:
    """tqdm when enabled; the latest finished step's loss (delivered by the Monitor) as postfix."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=label, unit="step", file=sys.stdout, mininterval=0.5)
        self.last_postfix = 0.0

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def note(self, rec) -> None:
        now = time.monotonic()
        if self.bar is not None and now - self.last_postfix > 0.5 and "loss" in rec.scalars:
            self.bar.set_postfix(loss=f"{rec.scalars['loss']:.3f}", refresh=False)
            self.last_postfix = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(cfg: Config) -> List[RunResult]:
    device = torch.device(cfg.device)
    problem = PermutedTasks(cfg.tasks, cfg.seed, device)
    print(f"trainscope demo: {cfg.tasks} permuted tasks × {cfg.steps_per_task} steps, "
          f"{cfg.depth}×{cfg.width} {cfg.activation} MLP, batch {cfg.batch_size}, SGD lr {cfg.lr}, on {device}")
    plans = [("plain backprop", None)]
    if cfg.compare:
        plans.append((cfg.compare.replace("_", "-"), cfg.compare))
    runs = []
    for label, mitigation in plans:
        out_dir = cfg.out if not cfg.compare else os.path.join(cfg.out, mitigation or "plain")
        problem = PermutedTasks(cfg.tasks, cfg.seed, device)  # the same stream of tasks for every run
        runs.append(train(cfg, problem, label, out_dir, mitigation))
    dashboard = os.path.join(cfg.out, "dashboard.png")
    plot_dashboard(cfg, runs, dashboard)
    print_summary(cfg, runs)
    print("\nwritten:")
    for r in runs:
        print(f"  {os.path.join(r.out_dir, 'metrics.csv')}  and TensorBoard events in {r.out_dir}")
    print(f"  {dashboard}")
    print(f"  view with: tensorboard --logdir {cfg.out}")
    return runs


def parse_args(argv=None) -> Config:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    ap.add_argument("--tasks", type=int, default=d.tasks)
    ap.add_argument("--steps-per-task", type=int, default=d.steps_per_task)
    ap.add_argument("--width", type=int, default=d.width)
    ap.add_argument("--depth", type=int, default=d.depth)
    ap.add_argument("--activation", choices=sorted(ACTIVATIONS), default=d.activation)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--seed", type=int, default=d.seed)
    gpu = torch.cuda.is_available() and trainscope.built_with_cuda()  # a CPU-only build refuses CUDA tensors
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--out", default=d.out)
    ap.add_argument("--compare", choices=["shrink_perturb", "l2"], default=None,
                    help="also train with this mitigation beside plain backprop")
    ap.add_argument("--tiny", action="store_true", help="a quick preset (12 tasks × 200 steps) for tests")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.tiny:
        a.tasks, a.steps_per_task = 12, 200
    for name in ("tasks", "steps_per_task", "width", "depth", "batch_size"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return Config(tasks=a.tasks, steps_per_task=a.steps_per_task, width=a.width, depth=a.depth,
                  activation=a.activation, lr=a.lr, batch_size=a.batch_size, seed=a.seed, device=a.device,
                  out=a.out, compare=a.compare, progress=not a.no_progress)


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
