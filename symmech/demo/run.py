"""``symmech demo`` and ``symmech detect``: train real networks and hold the laws against them.

The demo is what a user's own training looks like with symmech: a plain PyTorch loop
(``torch.optim.SGD``, cross-entropy, mini-batches) with one added line, ``symmech.track(model,
optimizer, example_input=...)``, which detects the model's symmetries and evaluates every law
live. Per model it writes, under ``--output/<model>/``:

* ``records.csv``: the tracker's history (observed Q and each law's prediction, per group);
* ``theory_vs_observed.png``: per symmetry and layer, observed (solid) vs. the laws (dashed,
  dotted);
* ``errors.png``: the error of each law against the step, relative to the family's scale;

and prints (and writes to ``--output/summary.txt``) a table of each law's largest error
per model and symmetry, with the test accuracy. See :func:`max_relative_errors` for the error's
definition.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from symmech.demo.data import Dataset, get_dataset, make_loader
from symmech.demo.models import build_model
from symmech.demo.options import DEFAULT_MODELS, add_demo_arguments, learning_rate, parse_models
from symmech.demo.progress import ProgressBar, format_progress  # noqa: F401 - re-exported
from symmech.errors import SymmechError
from symmech.laws.names import CONTINUOUS, DISCRETE, DISCRETE_RESIDUAL, GRADIENT_FLOW, LAWS
from symmech.runtime.error_scale import ERROR_DEFINITION, error_scales, merge_scales, term_scales
from symmech.viz.plots import (
    GroupHistory,
    group_histories,
    plot_errors,
    relative_error_curves,
    symmetry_order,
)

__all__ = [
    "ModelResult",
    "ProgressBar",
    "demo_arguments",
    "detect_command",
    "format_error_table",
    "format_progress",
    "max_relative_errors",
    "model_kwargs",
    "run_demo",
    "train_model",
]

_LAW_HEADERS = {
    GRADIENT_FLOW: "gradient flow",
    CONTINUOUS: "continuous",
    DISCRETE: "exact discrete",
    DISCRETE_RESIDUAL: "discrete + r",
}


# --------------------------------------------------------------------------------------------
# progress bar


def max_relative_errors(
    records: Sequence[Mapping[str, Any]] | Sequence[GroupHistory],
    scales: Mapping[tuple[str, str], float] | None = None,
) -> dict[str, dict[str, float | None]]:
    """Per symmetry and law, the largest error of the law over the whole run.

    The error of group j at logged step k is ``|Q_law,j(k) − Q_obs,j(k)| / S``, S the scale of
    the group's family: ``scales[(symmetry, layer)]`` (from
    :func:`symmech.runtime.error_scale.error_scales`, which counts the size of Q's terms, so a Q
    that stays 0 is measured against its parameters), else the family's largest |Q_obs| over
    the run (S = 0: the absolute error). The result takes the maximum over every step and
    every group of every layer of the symmetry. A law with no value for any group
    (``None``/NaN, e.g. when the optimizer settings break its closure) is ``None``.

    Returns ``{symmetry: {"gradient_flow": e, "continuous": e, "discrete": e}}``, symmetries in
    the order translation, scale, rescale, then the others.
    """
    curves = relative_error_curves(records, scales)
    table: dict[str, dict[str, float | None]] = {}
    for symmetry in symmetry_order(curves):
        row: dict[str, float | None] = {}
        for law in LAWS:
            if law in curves[symmetry]:
                err = curves[symmetry][law][1]
                err = err[np.isfinite(err)]
                row[law] = float(err.max()) if err.size else None
            else:
                row[law] = None
        table[symmetry] = row
    return table


@dataclass
class ModelResult:
    """What the demo learned about one model."""

    name: str
    records: list[dict[str, Any]]
    test_accuracy: float
    final_loss: float
    seconds: float
    steps: int
    attach_seconds: float = 0.0
    output_dir: Path | None = None
    families: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the largest size of Q's terms per (symmetry, layer) seen in the run (see error_scale)
    terms: dict[tuple[str, str], float] = field(default_factory=dict)

    @cached_property
    def histories(self) -> list[GroupHistory]:
        """The records arranged per layer, made once (see :func:`group_histories`)."""
        return group_histories(self.records)

    @cached_property
    def scales(self) -> dict[tuple[str, str], float]:
        """Each family's error scale (see :mod:`symmech.runtime.error_scale`)."""
        return error_scales(self.histories, self.terms)


def _group_counts(histories: Sequence[GroupHistory]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for h in histories:
        counts[h.symmetry] = counts.get(h.symmetry, 0) + h.n_groups
    return counts


def _layer_notes(histories: Sequence[GroupHistory]) -> list[str]:
    notes: dict[str, None] = {}
    for h in histories:
        for note in h.notes:
            notes.setdefault(f"{h.symmetry} / {h.layer}: {note}")
    return list(notes)


def format_error_table(results: Sequence[ModelResult]) -> str:
    """The demo's summary table: per model and symmetry, each law's largest relative error.

    Columns: gradient flow (Q conserved), the continuous model, the exact discrete law (a pure
    prediction, r = 0) and, when the tracker reports it, the exact discrete law fed the measured
    symmetry residual r_k ("discrete + r"); a law no model has is left out.
    """
    tables = [(res, max_relative_errors(res.histories, res.scales)) for res in results]
    laws = [law for law in LAWS
            if law != DISCRETE_RESIDUAL
            or any(row[law] is not None for _, t in tables for row in t.values())]  # fmt: skip
    header = ["model", "test acc", "symmetry", "groups", *(_LAW_HEADERS[law] for law in laws)]
    rows: list[list[str]] = []
    notes: list[str] = []
    for res, errors in tables:
        counts = _group_counts(res.histories)
        accuracy = f"{100 * res.test_accuracy:.1f}%"
        if not errors:
            rows.append([res.name, accuracy, "(none tracked)", "0", *("-" for _ in laws)])
        for i, (symmetry, row) in enumerate(errors.items()):
            cells = ["n/a" if row[law] is None else f"{row[law]:.1e}" for law in laws]
            rows.append([res.name if i == 0 else "", accuracy if i == 0 else "", symmetry,
                         str(counts.get(symmetry, 0)), *cells])  # fmt: skip
        notes += [f"{res.name}: {n}" for n in _layer_notes(res.histories)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {0, 2}

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # fmt: skip

    out = [ERROR_DEFINITION, line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    if notes:
        out.append("notes (n/a: the law is not available for that layer):")
        out += [f"  {n}" for n in notes]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# training


def demo_arguments(
    args: argparse.Namespace | Mapping[str, Any] | None = None,
) -> argparse.Namespace:
    """The demo's defaults, overridden by ``args`` (so a partial Namespace or dict works)."""
    defaults = add_demo_arguments(argparse.ArgumentParser()).parse_args([])
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    for key, value in given.items():
        setattr(defaults, key, value)
    return defaults


def model_kwargs(name: str, dataset: Dataset) -> dict[str, Any]:
    """Builder arguments that fit ``build_model(name)`` to the data set's image shape."""
    c, s, k = dataset.in_channels, dataset.image_size, dataset.num_classes
    width = int(dataset.X_train.shape[3])
    if name.startswith("vgg"):
        return {"in_channels": c, "num_classes": k, "image_size": s}
    if name == "mlp":
        return {"in_features": c * s * width, "num_classes": k}
    if name == "resnet18":
        return {"in_channels": c, "num_classes": k}
    if name == "transformer":  # each image row (all channels) is one token
        return {"seq_len": s, "in_features": c * width, "num_classes": k}
    return {"num_classes": k}


def _track_function():
    import symmech

    track = getattr(symmech, "track", None)
    if track is None:
        raise SymmechError(
            "symmech demo: symmech.track is not available; the runtime tracker "
            "(symmech/runtime/attach.py, tracker.py) must be installed with symmech"
        )
    return track


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SymmechError(f"symmech demo: --device {name} asked for, but CUDA is not available")
    return torch.device(name)


def _load(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> Dataset:
    try:
        return get_dataset(args.dataset, args.data_dir, dtype=dtype, device=device,
                           image_size=args.image_size)  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        raise SymmechError(f"symmech: cannot load --dataset {args.dataset}: {err}") from err


def _batches(loader: Any) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield from loader


@torch.no_grad()
def accuracy(model: nn.Module, X: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Share of ``X`` classified right, in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        correct = sum(int((model(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                      for i in range(0, len(X), batch_size))  # fmt: skip
    finally:
        model.train(was_training)
    return correct / max(len(X), 1)


def _check_optimizer_settings(args: argparse.Namespace) -> None:
    if args.optimizer != "sgd" and (args.nesterov or args.dampening):
        raise SymmechError(
            f"symmech demo: --nesterov and --dampening are torch.optim.SGD's, got --optimizer "
            f"{args.optimizer}"
        )
    if args.nesterov and (args.momentum <= 0 or args.dampening != 0):
        raise SymmechError(
            f"symmech demo: --nesterov needs --momentum > 0 and --dampening 0, got momentum "
            f"{args.momentum} and dampening {args.dampening} (torch.optim.SGD's rule)"
        )


def make_optimizer(params: Any, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The ``--optimizer`` with the demo's settings (weight decay coupled, AdamW's decoupled)."""
    lr, wd = learning_rate(args), args.weight_decay
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=args.momentum, dampening=args.dampening,
                               weight_decay=wd, nesterov=args.nesterov)  # fmt: skip
    if args.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=args.momentum, weight_decay=wd)
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}
    return kinds[args.optimizer](params, lr=lr, weight_decay=wd)


def train_model(
    name: str, dataset: Dataset, args: argparse.Namespace, output_dir: Path | None = None
) -> ModelResult:
    """Train ``name`` with SGD and a tracker for ``args.steps`` steps; write its files."""
    dtype, device = _dtype(args.dtype), _device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(name, **model_kwargs(name, dataset)).to(device=device, dtype=dtype)
    optimizer = make_optimizer(model.parameters(), args)
    loader = make_loader(dataset.X_train, dataset.y_train, args.batch_size, shuffle=True,
                         seed=args.seed)  # fmt: skip
    batches = _batches(loader)
    first = next(batches)
    track = _track_function()
    bar = ProgressBar(args.steps, f"{name:12s}", enabled=not args.no_progress)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # an (x, y) batch: the detected families are also confirmed numerically on it
        tracker = track(
            model, optimizer, example_input=first, loss_fn=F.cross_entropy, log_every=args.log_every
        )
        attached = time.perf_counter()
        terms = term_scales(tracker.families)  # before training: a head may start at zero
        model.train()
        loss = torch.zeros(())
        try:
            for step in range(args.steps):
                x, y = first if step == 0 else next(batches)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                bar.update(step + 1, loss.detach())
        finally:
            bar.close()
            tracker.detach()
            terms = merge_scales(terms, term_scales(tracker.families))
    seconds = time.perf_counter() - attached
    records = list(tracker.records())
    result = ModelResult(
        name=name,
        records=records,
        test_accuracy=accuracy(model, dataset.X_test, dataset.y_test),
        final_loss=float(loss.detach().item()),
        seconds=seconds,
        attach_seconds=attached - start,
        steps=args.steps,
        output_dir=output_dir,
        families=list(getattr(tracker, "families", [])),
        notes=list(dict.fromkeys(str(w.message) for w in caught)),
        terms=terms,
    )
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        tracker.to_csv(output_dir / "records.csv")
        title = _title(name, args)
        tracker.plot(output_dir / "theory_vs_observed.png", title=title)
        tracker.plot_anatomy(output_dir / "anatomy.png", title=title)
        if any(f.rotation for f in tracker.families):
            tracker.plot_rotation(output_dir / "rotation.png", title=title)
        plot_errors(result.histories, output_dir / "errors.png", title, scales=result.scales)
    return result


def _settings(args: argparse.Namespace) -> str:
    extras = ", nesterov" if args.nesterov else ""
    extras += f", dampening {args.dampening:g}" if args.dampening else ""
    name = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
            "adagrad": "Adagrad"}[args.optimizer]  # fmt: skip
    momentum = f", momentum {args.momentum:g}" if args.optimizer in ("sgd", "rmsprop") else ""
    return (f"{name} lr {learning_rate(args):g}{momentum}, weight decay "
            f"{args.weight_decay:g}{extras}, batch {args.batch_size}, {args.dtype}")  # fmt: skip


def _title(name: str, args: argparse.Namespace) -> str:
    return f"{name} on {args.dataset}: {_settings(args)}"


def _family_lines(result: ModelResult) -> list[str]:
    lines = []
    for fam in result.families:
        status = getattr(fam, "status", None) or ""
        note = getattr(fam, "note", None) or ""
        extra = ", ".join(str(s) for s in (status, note) if s)
        lines.append(f"  {fam.symmetry:12s} {fam.layer} [{fam.n_groups} groups]"
                     + (f" ({extra})" if extra else ""))  # fmt: skip
    return lines


def _parse_models(text: str) -> list[str]:
    try:
        return parse_models(text)
    except argparse.ArgumentTypeError as err:
        raise SymmechError(f"symmech demo: {err}") from None


def _threads(args: argparse.Namespace) -> int:
    """``--threads``, or its default: 1 for digits on the CPU, else torch's current setting."""
    if args.threads:
        return int(args.threads)
    if args.dataset == "digits" and not str(args.device).startswith("cuda"):
        # 8×8 images: intra-op threads only add synchronisation, and on a busy machine
        # they cost several times the step itself.
        return 1
    return torch.get_num_threads()


def run_demo(args: argparse.Namespace | Mapping[str, Any] | None = None) -> int:
    """``symmech demo``: train each model with a tracker, write files, print the error table.

    torch's intra-op thread count is set to ``--threads`` meanwhile and restored afterwards.
    """
    args = demo_arguments(args)
    previous = torch.get_num_threads()
    torch.set_num_threads(_threads(args))
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(previous)


def _run_demo(args: argparse.Namespace) -> int:
    _check_optimizer_settings(args)
    if not args.model:
        models = list(DEFAULT_MODELS)
    elif isinstance(args.model, str):
        models = _parse_models(args.model)
    else:
        models = list(args.model)
    dtype, device = _dtype(args.dtype), _device(args.device)
    output = Path(args.output)
    try:  # before any training: a bad --output should not cost a run
        for name in models:
            (output / name).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SymmechError(f"symmech demo: cannot write --output {output}: {err}") from err
    started = time.perf_counter()
    dataset = _load(args, dtype, device)
    print(f"symmech demo: {dataset.name}, {len(dataset.X_train)} training / {len(dataset.X_test)} "
          f"test images {tuple(dataset.X_train.shape[1:])}, {len(models)} model(s), "
          f"{args.steps} steps each -> {output}/")  # fmt: skip
    print(_settings(args))
    results = []
    for name in models:
        result = train_model(name, dataset, args, output / name)
        results.append(result)
        print(f"{name}: {len(result.families)} families tracked (detected and confirmed in "
              f"{result.attach_seconds:.1f} s); {result.steps} steps in {result.seconds:.1f} s, "
              f"final loss {result.final_loss:.3g}, test accuracy "
              f"{100 * result.test_accuracy:.1f}%")  # fmt: skip
        for line in _family_lines(result):
            print(line)
        for note in result.notes:
            print(f"  note: {note}")
    table = format_error_table(results)
    print()
    print(table)
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.txt").write_text(table + "\n")
    print()
    for res in results:
        print(f"wrote {res.output_dir}/records.csv, theory_vs_observed.png, errors.png, "
              "anatomy.png" + (", rotation.png" if (res.output_dir / "rotation.png").exists()
                               else ""))  # fmt: skip
    print(f"wrote {output}/summary.txt ({time.perf_counter() - started:.1f} s in all)")
    return 0


# --------------------------------------------------------------------------------------------
# detect


def detect_command(args: argparse.Namespace) -> int:
    """``symmech detect --model NAME``: detect the model's symmetries, confirm them on a batch."""
    from symmech.model.detect import SymmetryWarning, detect, format_table
    from symmech.model.evaluator import CONFIRM_SAMPLES
    from symmech.runtime.attach import detection_input

    name = getattr(args, "model", None) or "vgg-tiny-bn"
    if isinstance(name, (list, tuple)):
        name = name[0]
    dataset_args = argparse.Namespace(dataset=getattr(args, "dataset", "digits") or "digits",
                                      data_dir=getattr(args, "data_dir", None),
                                      image_size=getattr(args, "image_size", 32))  # fmt: skip
    dataset = _load(dataset_args, torch.float32, torch.device("cpu"))
    torch.manual_seed(getattr(args, "seed", 0) or 0)
    try:
        model = build_model(name, **model_kwargs(name, dataset))
    except ValueError as err:
        raise SymmechError(f"symmech detect: {err}") from err
    x, y = dataset.X_train[:64], dataset.y_train[:64]
    with warnings.catch_warnings():  # every note is printed with the table
        warnings.simplefilter("ignore", SymmetryWarning)
        families = detect(
            model, detection_input(x, (x, y)), loss_fn=F.cross_entropy, confirm_batch=(x, y)
        )
    print(
        f"{name} on {dataset.name} {tuple(x.shape[1:])}, confirmed on the first {CONFIRM_SAMPLES} "
        f"samples of a batch of {len(x)}:"
    )
    print(format_table(families))
    return 0
