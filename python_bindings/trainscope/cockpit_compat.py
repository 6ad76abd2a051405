"""Cockpit's three configurations as trainscope settings (README "Coming from Cockpit").

:func:`cockpit_configuration` returns the keyword arguments of :class:`trainscope.Monitor` that
measure what Cockpit v1.0.2's ``configuration(label)`` tracks (``cockpit/utils/configuration.py``),
each quantity under its trainscope name::

    mon = trainscope.Monitor(model, **trainscope.cockpit_configuration("business", every(10)),
                             sinks=[trainscope.TensorBoardSink("runs/x")])
    ...
    mon.step(step, losses, closure=lambda: F.cross_entropy(model(x), y, reduction="none"))

=========================  =====================================================================
Cockpit quantity           trainscope (Monitor argument: record name)
=========================  =====================================================================
Loss                       ``metrics["loss"]``: ``loss``
GradNorm                   ``metrics["grad_norm"]``: ``grad_norm`` (per tensor ``grad_norm/<p>``)
Distance                   ``metrics["distance"]``: ``distance`` (from the parameters at construction)
UpdateSize                 ``metrics["update_size"]``: ``update_size`` (of the latest optimizer step)
NormTest, InnerTest,       ``per_sample``: ``per_sample/norm_test``, ``inner_test``, ``ortho_test``
OrthoTest                  (the squares of Cockpit's values)
GradHist1d                 ``per_sample_hist``: ``per_sample_grad_hist1d`` (per-sample gradients)
GradHist2d                 ``per_sample_options["hist2d"]``: ``per_sample_grad_hist2d``
Alpha                      ``alpha``: ``alpha`` (recorded with the step after the one it measures)
MeanGSNR, CABS,            ``grad_variance``: ``grad_variance/mean_gsnr``, ``grad_variance/cabs``,
EarlyStopping              ``grad_variance/early_stopping``
HessMaxEV, HessTrace,      ``curvature``: ``curvature/hess_max_ev``, ``curvature/hess_trace``,
TICDiag, TICTrace          ``curvature/tic_diag``, ``curvature/tic_trace``
=========================  =====================================================================
"""

from __future__ import annotations

from typing import Any, Dict

#: Cockpit's configuration labels, least to most expensive.
COCKPIT_CONFIGURATIONS = ("economy", "business", "full")


def cockpit_configuration(label: str, schedule: Any = True) -> Dict[str, Any]:
    """:class:`trainscope.Monitor` keyword arguments for Cockpit's configuration ``label``
    ("economy", "business" or "full"), every quantity on ``schedule`` (a trainscope schedule or
    True for every step, as Cockpit's ``track_schedule``):

    - "economy": loss, grad_norm, distance and update_size (the other parameter metrics and the
      gradient histogram off), the per-sample statistics (the norm, inner-product and
      orthogonality tests), the per-sample gradient histogram and alpha;
    - "business": also the curvature family's ``tic_diag`` and ``hess_trace`` (the step needs
      a ``closure``: see :class:`trainscope.Monitor`);
    - "full": also ``hess_max_ev`` and the joint per-sample histogram (gradient against parameter
      value).

    Cockpit's ``hess_trace`` and ``tic_diag`` use BackPACK's exact Hessian diagonal; so does the
    curvature family here (``method="auto"``) for networks linear in each parameter element
    (ReLU, max-pool, linear and convolutional layers: Cockpit's own nets), from layer factors.
    Where that does not apply (tanh, normalisations, attention, ...) it estimates the diagonal
    (Hutchinson, 100 probes, its standard error recorded as ``curvature/hess_trace_stderr``) and
    warns once saying why. A new dict at every call."""
    if label not in COCKPIT_CONFIGURATIONS:
        raise ValueError(f"cockpit_configuration: label must be one of {COCKPIT_CONFIGURATIONS}, got {label!r}")
    if schedule is None or schedule is False:
        raise ValueError("cockpit_configuration: schedule must be a schedule or True, got " + repr(schedule))
    s = schedule
    out: Dict[str, Any] = {
        "param_metrics": False,
        "grad_hist": False,
        "metrics": {"loss": s, "grad_norm": s, "distance": s, "update_size": s},
        "per_sample": s,
        "per_sample_hist": s,
        "alpha": s,
    }
    if label in ("business", "full"):
        out["curvature"] = s
        out["curvature_options"] = {"which": ["tic_diag", "hess_trace"], "method": "auto"}
    if label == "full":
        out["curvature_options"]["which"].append("hess_max_ev")
        out["per_sample_options"] = {"hist2d": True}
    return out
