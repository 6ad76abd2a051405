"""A Monitor sink that writes to TensorBoard: each finished step's scalars with ``add_scalar``
and its histograms as real TensorBoard histograms (``add_histogram_raw``) from trainscope's bin
edges and exact counts::

    mon = trainscope.Monitor(model, sinks=[trainscope.TensorBoardSink("runs/exp")])

The Lightning callbacks (trainscope.lightning) log histograms through ``histogram_summary`` too.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ._args import check_path


def histogram_summary(edges: torch.Tensor, counts: torch.Tensor) -> Optional[Dict[str, Any]]:
    """The arguments of TensorBoard's ``add_histogram_raw`` for a binned histogram (host tensors:
    ``edges`` [nbins + 1], ``counts`` [nbins]); None when it holds no values.

    The values themselves are not kept, so ``num`` is exact and the rest comes from the bins:
    ``sum`` and ``sum_squares`` from the bin centres, ``min`` and ``max`` are the outer edges of the
    lowest and highest non-empty bins. As TensorBoard's own ``add_histogram`` does, empty bins at
    both ends are left out, so that the first bucket starts at ``min`` and the last ends at ``max``;
    ``bucket_limits`` are the right edges of the buckets kept. Edges and counts of other lengths
    (or a 2-D histogram) are a ValueError naming them.
    """
    edges = edges if isinstance(edges, torch.Tensor) else torch.as_tensor(edges, dtype=torch.float64)
    counts = counts if isinstance(counts, torch.Tensor) else torch.as_tensor(counts)
    if counts.dim() != 1 or edges.dim() != 1 or edges.numel() != counts.numel() + 1:
        raise ValueError(f"histogram_summary: a 1-D histogram has len(edges) = len(counts) + 1, got edges of shape "
                         f"{tuple(edges.shape)} and counts of shape {tuple(counts.shape)}")
    if counts.is_floating_point() or counts.is_complex():
        raise TypeError(f"histogram_summary: counts must be integers, got {counts.dtype}")
    e = edges.tolist()
    c = counts.tolist()
    nonzero = [i for i, n in enumerate(c) if n]
    if not nonzero:
        return None
    lo, hi = nonzero[0], nonzero[-1]
    num = s = s2 = 0.0
    for i in range(lo, hi + 1):
        centre = 0.5 * (e[i] + e[i + 1])
        num += c[i]
        s += c[i] * centre
        s2 += c[i] * centre * centre
    return {"min": e[lo], "max": e[hi + 1], "num": num, "sum": s, "sum_squares": s2,
            "bucket_limits": e[lo + 1:hi + 2], "bucket_counts": c[lo:hi + 1]}


class TensorBoardSink:
    """Writes every finished step (a :class:`trainscope.StepRecord`) to a TensorBoard
    ``SummaryWriter`` in ``log_dir``: scalars as ``<prefix>/<name>``, histograms as
    ``<prefix>/<name>`` at the record's step. ``flush()`` writes the event file (the Monitor calls
    it at its own ``flush()``, also when a ``with Monitor(...)`` block exits by an exception);
    ``close()`` flushes and closes it."""

    def __init__(self, log_dir: str, prefix: str = "trainscope"):
        from torch.utils.tensorboard import SummaryWriter  # imported here: needs the tensorboard package
        self.writer = SummaryWriter(check_path(log_dir, "log_dir", "TensorBoardSink"))
        self.prefix = prefix

    def __call__(self, record) -> None:
        for name, value in record.scalars.items():
            self.writer.add_scalar(f"{self.prefix}/{name}", value, record.step)
        for name, (edges, counts) in record.histograms.items():
            if counts.dim() != 1:
                continue  # TensorBoard has no 2-D histograms; JsonlSink keeps them
            summary = histogram_summary(edges, counts)
            if summary is not None:
                self.writer.add_histogram_raw(f"{self.prefix}/{name}", global_step=record.step, **summary)

    def flush(self) -> None:
        """Writes what is buffered to the event file (``Monitor.flush()`` calls it)."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
