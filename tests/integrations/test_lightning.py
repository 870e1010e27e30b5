"""SymmechCallback in a real ``lightning.pytorch.Trainer.fit`` (CPU, float64, 50 SGD steps).

The exact law the tracker predicts is compared with the charges computed by hand from the
parameters the trainer holds before every step (``support.mlp_charges``), and the scalars the
trainer's CSV logger wrote are read back from its file.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from support.lightning_nets import Classifier, loader  # noqa: E402
from support.mlp_charges import errors_against_hand, hand_charges  # noqa: E402

from symmech.errors import BindingError  # noqa: E402
from symmech.integrations.lightning import SymmechCallback  # noqa: E402
from symmech.runtime.error_scale import max_errors  # noqa: E402
from symmech.runtime.sinks import tag_part  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 50


@pytest.fixture
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Charges(pl.Callback):
    """Q and M by hand at θₖ (before step k) and after the last step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.at[trainer.global_step] = hand_charges(module.net[0], module.net[2])

    def on_train_end(self, trainer, module) -> None:
        self.at[trainer.global_step] = hand_charges(module.net[0], module.net[2])


def _fit(tmp_path: Path, callback: SymmechCallback) -> tuple[Charges, Path]:
    charges = Charges()
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[callback, charges],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(Classifier(), loader())
    return charges, Path(logger.log_dir) / "metrics.csv"


def test_fit_tracks_the_exact_law_and_logs_per_layer_scalars(tmp_path: Path, float64) -> None:
    callback = SymmechCallback(log_every=5, out_dir=tmp_path / "symmech")
    charges, metrics = _fit(tmp_path, callback)
    tracker = callback.tracker
    assert tracker is not None and tracker.step == STEPS
    assert {f.status for f in tracker.families} == {"tracked"}
    assert sorted({(f.symmetry) for f in tracker.families}) == ["rescale", "translation"]

    records = tracker.records()
    errors = errors_against_hand(records, charges.at)
    print("lightning exact-law error vs hand charges:", errors)
    assert set(errors) == {"translation_weight", "translation_bias", "rescale"}
    assert max(errors.values()) <= 1e-9
    # not vacuous: Q moved by far more than the tolerance (weight decay and the finite step)
    first, last = charges.at[0]["rescale"], charges.at[STEPS]["rescale"]
    assert np.abs(last[0] - first[0]).max() / last[1].max() > 1e-3

    with metrics.open() as fh:
        logged = list(csv.DictReader(fh))
    for f in tracker.families:
        base = f"symmech/{tag_part(f.symmetry)}/{tag_part(f.layer)}"
        rows = {int(r["step"]): r for r in logged if r.get(f"{base}/observed")}
        assert sorted(rows) == list(range(0, STEPS + 1, 5)), (base, sorted(rows))
        for step, row in rows.items():
            hand = charges.at[step]
            k = "rescale" if f.symmetry == "rescale" else None
            if k is None:
                k = "translation_bias" if f.layer.endswith("bias") else "translation_weight"
            q, m = hand[k]
            assert abs(float(row[f"{base}/observed"]) - q.sum()) <= 1e-12 * (1 + m.sum())
            assert abs(float(row[f"{base}/discrete"]) - q.sum()) <= 1e-9 * (1 + m.sum())
            assert float(row[f"{base}/rel_error/discrete"]) <= 1e-9

    written = sorted(p.name for p in callback.written)
    assert written[0] in ("records.csv", "records.parquet") and written[1].endswith(".png")
    assert all(p.stat().st_size > 0 for p in callback.written)


def test_self_log_reaches_the_logger_and_bad_arguments_are_refused(tmp_path: Path, float64) -> None:
    callback = SymmechCallback(log_every=10, log_to="self.log")
    charges, metrics = _fit(tmp_path, callback)
    with metrics.open() as fh:
        logged = [
            r
            for r in csv.DictReader(fh)
            if any(k.endswith("/observed") and v for k, v in r.items())
        ]
    assert logged, "self.log wrote no symmech scalar"
    tracker = callback.tracker
    assert tracker is not None
    bias = next(f for f in tracker.families if f.layer.endswith("bias"))
    tag = f"symmech/translation/{tag_part(bias.layer)}/observed"
    for row in logged:  # self.log reports Lightning's step: Q after that many optimizer steps
        q = charges.at[int(row["step"]) + 1]["translation_bias"][0].sum()
        assert abs(float(row[tag]) - q) <= 1e-12

    with pytest.raises(BindingError, match=r"SymmechCallback\(log_every=0.*log_every must be"):
        SymmechCallback(log_every=0)
    with pytest.raises(BindingError, match=r"log_to must be one of .* got 'wandb'"):
        SymmechCallback(log_to="wandb")


class ReleaseProcessGroup(pl.Callback):
    """Destroy the gloo group at teardown, on every rank, after a last barrier.

    ``ddp_spawn`` children leave through ``os._exit``, so Lightning's atexit handler that destroys
    the group never runs there; on a loaded machine one rank then aborted at exit ("terminate
    called without an active exception", SIGABRT) after the fit had finished."""

    def teardown(self, trainer, module, stage) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_writes_once_and_holds_the_exact_law(tmp_path: Path) -> None:
    """``strategy="ddp_spawn"`` (DDP started by torch.multiprocessing; plain ``"ddp"`` relaunches
    the command line, i.e. pytest itself): records are a collective call, files come from rank 0."""
    callback = SymmechCallback(log_every=10, out_dir=tmp_path / "symmech")
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=CSVLogger(tmp_path, name="run", version=0),
        callbacks=[callback, ReleaseProcessGroup()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Classifier(), loader(n=320))
    out = sorted(p.name for p in (tmp_path / "symmech").iterdir())
    assert out == ["records.parquet", "theory_vs_observed.png"]
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(tmp_path / "symmech" / "records.parquet")
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    assert sorted(set(frame["step"])) == list(range(0, STEPS + 1, 10))
    errors = max_errors(rows)
    print("lightning ddp_spawn exact-law error:", {k: v["discrete"] for k, v in errors.items()})
    assert len(errors) == 3 and max(v["discrete"] for v in errors.values()) <= 1e-9
    assert max(v["gradient_flow"] for v in errors.values()) > 1e-3  # Q moved: not vacuous
    with (tmp_path / "run" / "version_0" / "metrics.csv").open() as fh:
        logged = list(csv.DictReader(fh))
    tags = [k for k in logged[0] if k.endswith("/rel_error/discrete")]
    assert len(tags) == 3
    steps = sorted({int(r["step"]) for r in logged if r[tags[0]]})
    assert steps == list(range(0, STEPS + 1, 10))
    assert max(float(r[t]) for r in logged for t in tags if r[t]) <= 1e-9
