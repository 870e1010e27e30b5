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
import torch.nn.functional as F

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from support.mlp_charges import errors_against_hand, hand_charges, mlp  # noqa: E402

from symmech.errors import BindingError  # noqa: E402
from symmech.integrations.lightning import SymmechCallback  # noqa: E402
from symmech.runtime.sinks import tag_part  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 50


@pytest.fixture
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp(seed=0)
        g = torch.Generator().manual_seed(1)
        self.example_input_array = torch.randn(16, 8, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


class Charges(pl.Callback):
    """Q and M by hand at θₖ (before step k) and after the last step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.at[trainer.global_step] = hand_charges(module.net[0], module.net[2])

    def on_train_end(self, trainer, module) -> None:
        self.at[trainer.global_step] = hand_charges(module.net[0], module.net[2])


def _loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(160, 8, generator=g), torch.randint(0, 4, (160,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


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
    trainer.fit(Classifier(), _loader())
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
