"""The exact law under every modelled optimizer: worst error per optimizer and symmetry, one table.

    python benchmarks/optimizer_table.py [--steps 1000] [--models vgg-tiny-bn,vgg-tiny,transformer]
                                         [--dtypes float64,float32]

Trains each demo network on the digits (mini-batches of 64, the demo's data) with SGD, Adam,
AdamW, AdamW + amsgrad, RMSprop (momentum, centered) and Adagrad, every detected family tracked
from step 0, and prints per optimizer × symmetry the largest error of the exact discrete law over
the run and the groups, relative to the family's scale (``symmech.runtime.error_scale``). A family
whose residual visibly moves Q (BatchNorm's eps) is judged on ``discrete_residual``, the law fed
the measured rₖ, which is what the tracker calls exact for it; the table says which.
Also checks that training is bit-identical with and without the tracker for each optimizer.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import symmech
from symmech.demo.data import get_dataset, make_loader
from symmech.demo.models import build_model
from symmech.demo.run import model_kwargs
from symmech.runtime.error_scale import max_errors, term_scales

OPTIMIZERS = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "Adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=5e-4),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=5e-2),
    "AdamW+amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=5e-2, amsgrad=True),
    "RMSprop": lambda p: torch.optim.RMSprop(
        p, lr=1e-4, momentum=0.9, centered=True, weight_decay=5e-4
    ),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=5e-4),
}


def run(model_name: str, opt_name: str, steps: int, dtype: torch.dtype, tracked: bool):
    data = get_dataset("digits", None, dtype=dtype, device="cpu")
    torch.manual_seed(0)
    model = build_model(model_name, **model_kwargs(model_name, data)).to(dtype=dtype)
    opt = OPTIMIZERS[opt_name](model.parameters())
    loader = make_loader(data.X_train, data.y_train, 64, shuffle=True, seed=0)
    batches = iter(())
    first = next(iter(loader))
    tracker = None
    if tracked:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tracker = symmech.track(model, opt, example_input=first, loss_fn=F.cross_entropy)
    for k in range(steps):
        try:
            x, y = first if k == 0 else next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--models", default="vgg-tiny-bn,vgg-tiny,transformer")
    parser.add_argument("--dtypes", default="float64,float32")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--no-identity-check", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    worst: dict[tuple[str, str, str], tuple[float, str]] = {}
    identical: dict[str, bool] = {}
    symmetries: list[str] = []
    for dtype in dtypes:
        for opt_name in args.optimizers.split(","):
            for model_name in args.models.split(","):
                start = time.perf_counter()
                model, tracker = run(model_name, opt_name, args.steps, dtype, True)
                rows = tracker.records()
                errors = max_errors(rows, term_scales(tracker.families))
                for f in tracker.families:
                    err = errors.get((f.symmetry, f.layer), {})
                    law = "discrete" if f.status == "tracked" else "discrete_residual"
                    value = err.get(law)
                    if value is None:
                        continue
                    key = (str(dtype).removeprefix("torch."), opt_name, f.symmetry)
                    mark = "" if law == "discrete" else " (+r)"
                    if key not in worst or value > worst[key][0]:
                        worst[key] = (value, mark)
                    if f.symmetry not in symmetries:
                        symmetries.append(f.symmetry)
                if dtype == torch.float64 and not args.no_identity_check:
                    plain, _ = run(model_name, opt_name, args.steps, dtype, False)
                    same = all(
                        torch.equal(a, b)
                        for a, b in zip(model.state_dict().values(), plain.state_dict().values())
                    )
                    identical[opt_name] = identical.get(opt_name, True) and same
                print(
                    f"# {model_name} {opt_name} {dtype}: {len(tracker.families)} families, "
                    f"{time.perf_counter() - start:.1f} s",
                    flush=True,
                )
    print()
    print(f"Worst relative error of the exact law over {args.steps} steps ({args.models})")
    header = ["dtype", "optimizer", *symmetries]
    if identical:
        header.append("training bit-identical")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for dtype in dtypes:
        d = str(dtype).removeprefix("torch.")
        for opt_name in args.optimizers.split(","):
            cells = [d, opt_name]
            for s in symmetries:
                v = worst.get((d, opt_name, s))
                cells.append("–" if v is None else f"{v[0]:.1e}{v[1]}")
            if identical:
                cells.append(
                    ("yes" if identical.get(opt_name) else "NO") if dtype == torch.float64 else ""
                )
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
