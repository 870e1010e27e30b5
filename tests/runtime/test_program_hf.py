"""Hugging Face attention heads read at once (symmech/runtime/program.py), built from small
configs (no download), float64.

GPT-2 (``Conv1D``: a head's features are columns of the fused ``c_attn`` weight and rows of
``c_proj``'s) and BERT (``nn.Linear``: rows of q, k, v, columns of the output dense), heads of 16
features, so one family per diagonal generator eᵢeᵢᵀ: under AdamW and heavy-ball SGD every head
family's bank is read at once on every steady step, the records equal the per-family eager
path's to 1e-12, and training is bit-identical to an untracked twin.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from support.training import assert_same_training, worst_record_difference

import symmech
from symmech.runtime import fused, native, program
from symmech.runtime.family import TrackerWarning

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # detection notes; HF config warnings
]

VOCAB, T, STEPS = 50, 8, 6


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=VOCAB,
                                     n_positions=16)  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double()


def _bert() -> torch.nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=16, num_labels=3)  # fmt: skip
    return transformers.BertForSequenceClassification(config).double()


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert native.build(), f"the C++ kernel could not be built: {native.failure()}"


def _run(name: str, optimizer: str, mode: str | None, monkeypatch=None):
    torch.manual_seed(0)
    model = _gpt2() if name == "gpt2" else _bert()
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, T), generator=gen)
    labels = ids if name == "gpt2" else torch.randint(0, 3, (4,), generator=gen)
    tracker, read = None, []
    if mode is not None:
        saved = fused.MODE
        fused.MODE = mode
        tracker = symmech.track(model, opt, example_input=(ids, labels), log_every=1)
        original = program.Programs.before

        def before(programs, banks, log):  # the head families read at once, per step
            step = original(programs, banks, log)
            if step is not None:
                heads = [banks[n] for n in step.banks if banks[n].families[0].module.CONSTANTS]
                read.append(sum(len(b.families) for b in heads))
            return step

        monkeypatch.setattr(program.Programs, "before", before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackerWarning)
        for _ in range(STEPS):
            opt.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
    if mode is not None:
        monkeypatch.undo()
        fused.MODE = saved
    rows = None if tracker is None else tracker.records()
    return model, opt, tracker, rows, read


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_heads_read_at_once_equal_the_eager_records(monkeypatch, name, optimizer) -> None:
    plain, plain_opt, _, _, _ = _run(name, optimizer, None)
    _, _, _, eager_rows, _ = _run(name, optimizer, "eager", monkeypatch)
    model, opt, tracker, rows, read = _run(name, optimizer, "native", monkeypatch)
    heads = [f for f in tracker.families if f.symmetry.startswith("attention")]
    assert len(heads) == 2 * 16  # qk and vo, one family per feature of a 16-feature head
    assert len(read) >= STEPS - 2 and all(n == len(heads) for n in read), read
    assert tracker._programs.off is None
    assert eager_rows is not None and rows is not None
    assert worst_record_difference(rows, eager_rows) <= 1e-12
    assert_same_training(plain, model, plain_opt, opt)
