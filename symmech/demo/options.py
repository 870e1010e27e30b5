"""Command-line options of ``symmech demo``.

The defaults run the standard pair of networks on scikit-learn's digits, each with every
symmetry symmech detects in it: ``vgg-tiny-bn`` (translation of the output layer, scale of every
conv channel through BatchNorm, rescale around every ReLU) and ``vgg-tiny`` (translation, rescale).
They train with ``torch.optim.SGD`` at the settings of the paper's experiments
(momentum 0.9, weight decay 5e-4) long enough for the continuous model and the exact discrete law
to part ways visibly, and the whole demo takes well under two minutes on two CPU cores.
"""

from __future__ import annotations

import argparse

from symmech.demo.data import DATASET_NAMES
from symmech.demo.models import MODEL_NAMES

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_MODELS",
    "DEFAULT_STEPS",
    "OPTIMIZER_NAMES",
    "add_demo_arguments",
    "learning_rate",
    "parse_models",
]

#: Models the demo trains when ``--model`` is not given.
DEFAULT_MODELS: tuple[str, ...] = ("vgg-tiny-bn", "vgg-tiny")
#: Training steps per model by default (about 13 epochs of digits at batch 64). Measured: the
#: whole default demo (float64, tracker on every step, both models, files and plots) takes
#: 30-40 s wall on two CPU cores shared with other work (load 5-6), 17-18 s of CPU time.
DEFAULT_STEPS = 300


#: Optimizers the demo trains with (``--optimizer``), each tracked by the exact law.
OPTIMIZER_NAMES: tuple[str, ...] = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
#: The learning rate when ``--lr`` is not given, per optimizer.
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-4, "adagrad": 1e-2}


def learning_rate(args: argparse.Namespace) -> float:
    """``--lr``, or the optimizer's default learning rate when it was not given."""
    return DEFAULT_LR[args.optimizer] if args.lr is None else float(args.lr)


def parse_models(text: str) -> list[str]:
    """``"vgg-tiny-bn,vgg-tiny"`` → ``["vgg-tiny-bn", "vgg-tiny"]``; unknown names are an error."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--model needs at least one model name")
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        valid = ", ".join(MODEL_NAMES)
        raise argparse.ArgumentTypeError(
            f"unknown model {unknown[0]!r}; valid names are {valid} (several: comma-separated)"
        )
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _device(text: str) -> str:
    if text == "cpu" or text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``symmech demo`` options to ``parser`` (and return it)."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_NAMES, default="digits",
                      help="digits (bundled with scikit-learn, default), cifar10 (python "
                           "pickles in --data-dir) or folder (--data-dir/<class>/*.png)")  # fmt: skip
    data.add_argument("--data-dir", default=None,
                      help="folder holding the data for --dataset cifar10 or folder")  # fmt: skip
    data.add_argument("--image-size", type=_positive_int, default=32,
                      help="side images are resized to, for --dataset folder (default 32)")  # fmt: skip

    model = parser.add_argument_group("model and optimiser")
    model.add_argument("--model", type=parse_models, default=None, metavar="NAME[,NAME...]",
                       help=f"model(s) to train, from {', '.join(MODEL_NAMES)}; default: "
                            f"{' and '.join(DEFAULT_MODELS)} (scale, rescale and translation "
                            "between them)")  # fmt: skip
    model.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS,
                       help=f"optimizer steps per model (default {DEFAULT_STEPS})")  # fmt: skip
    model.add_argument("--batch-size", type=_positive_int, default=64,
                       help="mini-batch size (default 64)")  # fmt: skip
    model.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="sgd",
                       help="torch.optim optimiser (default sgd); --momentum is SGD's and "
                            "RMSprop's, --dampening and --nesterov SGD's only")  # fmt: skip
    model.add_argument("--lr", type=_non_negative_float, default=None,
                       help="learning rate η (default: " + ", ".join(
                           f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")  # fmt: skip
    model.add_argument("--momentum", type=_non_negative_float, default=0.9,
                       help="momentum β (default 0.9)")  # fmt: skip
    model.add_argument("--weight-decay", type=_non_negative_float, default=5e-4,
                       help="weight decay λ (default 5e-4)")  # fmt: skip
    model.add_argument("--dampening", type=_non_negative_float, default=0.0,
                       help="momentum dampening τ (default 0)")  # fmt: skip
    model.add_argument("--nesterov", action="store_true", help="Nesterov momentum")

    run = parser.add_argument_group("run")
    run.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                     help="parameter and data type (default float64: the exact discrete law then "
                          "holds to round-off, ~1e-12)")  # fmt: skip
    run.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    run.add_argument("--log-every", type=_positive_int, default=1,
                     help="record the history every K steps (default 1)")  # fmt: skip
    run.add_argument("--output", default="demo_output", metavar="DIR",
                     help="folder for records.csv and the plots, one subfolder per model "
                          "(default demo_output)")  # fmt: skip
    run.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                     help="torch CPU threads (default: 1 for digits, whose 8×8 images gain "
                          "nothing from more; otherwise torch's default)")  # fmt: skip
    run.add_argument("--seed", type=int, default=0, help="seed of initialisation and batches")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser
