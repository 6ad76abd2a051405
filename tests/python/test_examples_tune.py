"""examples/tune_lr_batch.py: the learning-rate × batch-size sweep runs with --quick, writes its
figure, and its summary says what plain SGD implies (the update ratio grows with the learning
rate); its smoothing of B_simple divides the smoothed parts, not the ratios."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import env_with_trainscope_on_path

pytest.importorskip("lightning")
pytest.importorskip("matplotlib")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tune_lr_batch.py"
ROW = re.compile(r"^\s*(\S+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "figure.png"
    flags = ["-S"] if sys.flags.no_site else []  # the same trainscope as this interpreter's
    proc = subprocess.run([sys.executable, *flags, str(EXAMPLE), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=180, env=env_with_trainscope_on_path())
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    rows = []
    for line in proc.stdout.splitlines():
        m = ROW.match(line)
        if m and m.group(1) != "lr":
            lr, batch, loss, ratio, noise, _ = m.groups()
            rows.append(dict(lr=float(lr), batch=int(batch), final_loss=float(loss),
                             median_update_ratio=float(ratio), b_simple_end=float(noise)))
    return out, rows, proc.stdout


def test_writes_the_figure(quick_run):
    out, _, _ = quick_run
    assert out.is_file() and out.stat().st_size > 30_000
    import matplotlib.image
    img = matplotlib.image.imread(str(out))
    assert img.shape[0] >= 600 and img.shape[1] >= 1000
    assert img[..., :3].std() > 0.05  # lines and text, not a blank canvas


def test_one_summary_row_per_run(quick_run):
    _, rows, stdout = quick_run
    assert [(r["lr"], r["batch"]) for r in rows] == [(lr, b) for b in (16, 64) for lr in (0.01, 0.1, 1.0)], stdout
    for r in rows:
        assert math.isfinite(r["final_loss"]) and 0 < r["final_loss"] < 5, r
        # The library's update_ratio reached the records (NaN would mean it is missing).
        assert math.isfinite(r["median_update_ratio"]) and r["median_update_ratio"] > 0, r
        assert math.isfinite(r["b_simple_end"]), r


def test_update_ratio_grows_with_learning_rate(quick_run):
    # Plain SGD moves each weight by lr·g: over two decades of learning rate the median ratio of
    # update to weight norm grows by far more than 10x, whatever the gradients do meanwhile.
    _, rows, stdout = quick_run
    for batch in (16, 64):
        ratios = [r["median_update_ratio"] for r in sorted(rows, key=lambda r: r["lr"]) if r["batch"] == batch]
        assert all(a < b for a, b in zip(ratios, ratios[1:])), stdout
        assert ratios[-1] > 10 * ratios[0], stdout


def test_smallest_learning_rate_learns_least(quick_run):
    # At lr 0.01 a hundred steps barely leave chance level (ln 10 ≈ 2.30); the larger rates do better.
    _, rows, stdout = quick_run
    for batch in (16, 64):
        losses = {r["lr"]: r["final_loss"] for r in rows if r["batch"] == batch}
        assert losses[0.01] > 2.2, stdout
        assert min(losses[0.1], losses[1.0]) < losses[0.01] - 0.1, stdout


def _example_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("tune_lr_batch", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_b_simple_divides_the_smoothed_parts(monkeypatch):
    ex = _example_module(monkeypatch)
    from trainscope import StepRecord

    var, sig = ex.VARIANCE, ex.SIGNAL
    parts = [(10.0, 1.0), (30.0, 3.0), (10.0, 0.1)]
    records = [StepRecord(step=2 * i, scalars={var: v, sig: s}) for i, (v, s) in enumerate(parts)]
    records.insert(1, StepRecord(step=1, scalars={"loss": 1.0}))  # a step without per-sample statistics
    run = ex.Run(lr=0.1, batch_size=16, weights=[], records=records)
    steps, b = ex.smoothed_noise_scale(run, beta=0.5)
    assert steps == [0, 2, 4]
    # Moving averages of each part, then their ratio.
    m_var = m_sig = 0.0
    expected = []
    for n, (v, s) in enumerate(parts, start=1):
        m_var, m_sig = 0.5 * m_var + 0.5 * v, 0.5 * m_sig + 0.5 * s
        expected.append(m_var / m_sig)
    assert b == pytest.approx(expected)
    assert b[0] == pytest.approx(10.0)
    # Not the average of the raw ratios (10, 10, 100): the noisy last ratio is damped.
    assert b[-1] == pytest.approx((0.125 * 10 + 0.25 * 30 + 0.5 * 10) / (0.125 * 1 + 0.25 * 3 + 0.5 * 0.1))
    assert b[-1] < 20
