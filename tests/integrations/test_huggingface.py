"""SymmechTrainerCallback in a real ``transformers.Trainer`` run: a one-layer BERT classifier built
from its config (no download), float64, 50 steps on CPU.

The symmetries are detected through the callback (translation of the classifier, confirmed on
a batch); the laws are compared with the charges computed by hand from the classifier's
parameters before every step (``support.mlp_charges.translation_charges``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from support.mlp_charges import errors_against_hand, translation_charges  # noqa: E402

from symmech.errors import BindingError  # noqa: E402
from symmech.integrations.huggingface import SymmechTrainerCallback  # noqa: E402
from symmech.runtime.error_scale import max_errors, term_scales  # noqa: E402
from symmech.runtime.sinks import tag_part  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 50


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 8) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 50, (n, length), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class Charges(transformers.TrainerCallback):
    """The classifier's charges by hand at θₖ (before step k) and after the last step."""

    def __init__(self) -> None:
        self.at: dict[int, dict] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = translation_charges(model.classifier)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = translation_charges(model.classifier)


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).double()


def _train(
    tmp_path: Path, sgd: bool, example: bool = True
) -> tuple[SymmechTrainerCallback, Charges, object]:
    model, data = _bert(), Tokens()
    batch = {"input_ids": data.ids[:16], "labels": data.labels[:16]} if example else None
    callback = SymmechTrainerCallback(example_input=batch, out_dir=tmp_path / "symmech")
    charges = Charges()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    sgd_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    optimizers = (sgd_opt, None) if sgd else (None, None)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        callbacks=[callback, charges],
        optimizers=optimizers,
    )
    trainer.train()
    return callback, charges, trainer


def _translations(tracker) -> list:
    return [f for f in tracker.families if f.symmetry == "translation"]


def _translation_rows(tracker) -> list[dict]:
    return [r for r in tracker.records() if r["symmetry"] == "translation"]


def _check_families(tracker, exact: bool = True) -> None:
    """BERT's families: the classifier translation (weight columns, bias), attention q/k and
    v/o per head and charge entry, the pooler's LayerNorm → dense rescale; with ``exact``, every
    family's law within 1e-9 of its scale (attention and norm families have no hand charges
    here: tests/model/test_detect_hf.py checks them against the weights)."""
    kinds = Counter(f.symmetry for f in tracker.families)
    assert kinds["translation"] == 2 and set(kinds) == {
        "translation",
        "attention_qk",
        "attention_vo",
        "norm_rescale",
        "scale",  # the embeddings' sum, read only by embeddings.LayerNorm
        "stream_rescale",  # the post-LN residual streams, one group each
    }, kinds
    assert not any(" model." in f.layer or f.layer.startswith("model.") for f in tracker.families)
    if exact:
        errors = max_errors(tracker.records(), term_scales(tracker.families))
        assert max(e["discrete"] for e in errors.values()) <= 1e-9, errors


def test_trainer_with_sgd_tracks_the_exact_law_and_logs_it(tmp_path: Path) -> None:
    callback, charges, trainer = _train(tmp_path, sgd=True)
    tracker = callback.tracker
    assert tracker is not None and tracker.step == STEPS
    assert {f.status for f in tracker.families} == {"tracked"}
    _check_families(tracker)
    errors = errors_against_hand(_translation_rows(tracker), charges.at)
    print("transformers SGD exact-law error vs hand charges:", errors)
    assert set(errors) == {"translation_weight", "translation_bias"}
    assert max(errors.values()) <= 1e-9
    moved = charges.at[STEPS]["translation_weight"][0] - charges.at[0]["translation_weight"][0]
    # not vacuous: weight decay moves Q (under a linear schedule and gradient clipping)
    assert np.abs(moved).max() / charges.at[0]["translation_weight"][1].max() > 1e-3

    logged = [e for e in trainer.state.log_history if any(k.startswith("symmech/") for k in e)]
    assert [e["step"] for e in logged] == list(range(10, STEPS + 1, 10))
    assert sorted(callback.logged) == list(range(10, STEPS + 1, 10))
    for entry in logged:
        hand = charges.at[entry["step"]]
        for f in _translations(tracker):
            base = f"symmech/translation/{tag_part(f.layer)}"
            k = "translation_bias" if f.layer.endswith("bias") else "translation_weight"
            q, m = hand[k]
            assert abs(entry[f"{base}/observed"] - q.sum()) <= 1e-12 * (1 + m.sum())
            assert abs(entry[f"{base}/discrete"] - q.sum()) <= 1e-9 * (1 + m.sum())
            assert entry[f"{base}/rel_error/discrete"] <= 1e-9
    names = sorted(p.name for p in callback.written)
    assert names[0] in ("records.csv", "records.parquet") and names[1].endswith(".png")


def test_trainer_default_adamw_is_exact_or_says_which_optimizer(tmp_path: Path) -> None:
    callback, charges, trainer = _train(tmp_path, sgd=False)
    tracker = callback.tracker
    assert tracker is not None and tracker.step == STEPS
    optimizer = type(tracker.optimizer).__name__
    assert optimizer.startswith("AdamW")
    _check_families(tracker, exact=False)
    errors = errors_against_hand(_translation_rows(tracker), charges.at)
    for f in _translations(tracker):
        k = "translation_bias" if f.layer.endswith("bias") else "translation_weight"
        if f.status == "tracked" or f.status.startswith("approximate"):
            assert errors[k] <= 1e-9, (f.layer, f.status, errors[k])
        else:
            assert f.status == "observed only", f.status
            assert optimizer in f.note, f.note


def test_without_example_input_detects_on_the_first_training_batch(tmp_path: Path) -> None:
    callback, charges, _ = _train(tmp_path, sgd=True, example=False)
    tracker = callback.tracker
    assert tracker is not None and not tracker.detection_pending
    assert sorted(f.layer for f in _translations(tracker)) == [
        "classifier (output layer) bias",
        "classifier (output layer) weight columns",
    ]
    _check_families(tracker)
    errors = errors_against_hand(_translation_rows(tracker), charges.at)
    assert set(errors) == {"translation_weight", "translation_bias"}
    assert max(errors.values()) <= 1e-9


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(BindingError, match=r"SymmechTrainerCallback\(log_every=0\).*int ≥ 1"):
        SymmechTrainerCallback(log_every=0)
    callback = SymmechTrainerCallback()
    with pytest.raises(BindingError, match="not a torch optimizer"):
        callback.on_train_begin(None, None, None, model=torch.nn.Linear(2, 2), optimizer=object())
