"""What the ``symmech`` command checks before it acts: output paths and tracker CSVs.

Each refusal is a :class:`~symmech.errors.SymmechError` whose message is one line: the command,
the offending value, and what to do instead.

>>> output_file("/nonexistent/x.tex", "latex")
Traceback (most recent call last):
...
symmech.errors.SymmechError: symmech latex -o '/nonexistent/x.tex': the folder /nonexistent does not exist. create it first, or choose another -o.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .errors import SymmechError, explain

#: The columns without which a CSV is not a tracker's records (``tracker.to_csv`` writes them).
RECORD_COLUMNS = ("step", "symmetry", "layer", "observed")

T = TypeVar("T")


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def output_file(given: str, verb: str, flag: str = "-o") -> Path:
    """The file ``given`` names, refused when it is a folder or its folder does not exist."""
    path = Path(given)
    call = f"symmech {verb} {flag} {given!r}"
    if path.is_dir():
        raise SymmechError(
            explain(call, "this is a folder", f"give a file name, e.g. {path / 'out'}")
        )
    parent = path.parent
    if not parent.exists():
        raise SymmechError(
            explain(
                call,
                f"the folder {parent} does not exist",
                f"create it first, or choose another {flag}",
            )
        )
    if not parent.is_dir():
        raise SymmechError(
            explain(call, f"{parent} is a file, not a folder", f"choose another {flag}")
        )
    return path


def output_folder(given: str | Path, verb: str) -> Path:
    """The folder ``given`` names; a missing one is accepted only when its parent exists."""
    path = Path(given)
    call = f"symmech {verb} -o {str(given)!r}"
    if path.exists() and not path.is_dir():
        raise SymmechError(explain(call, "this is a file, not a folder", "give a folder"))
    if not path.exists() and not path.parent.is_dir():
        raise SymmechError(
            explain(
                call,
                f"neither the folder nor its parent {path.parent} exists",
                "create the parent first, or choose another -o",
            )
        )
    return path


def writing(verb: str, target: str | Path, write: Callable[[], T]) -> T:
    """Run ``write``; an OSError (read-only disk, no permission, ...) becomes one line."""
    try:
        return write()
    except OSError as err:
        reason = err.strerror or one_line(err)
        where = err.filename or target
        raise SymmechError(
            explain(f"symmech {verb}", f"cannot write {where}: {reason}", "choose another -o")
        ) from None


def write_text(path: Path, text: str, verb: str) -> None:
    """``path.write_text(text)``, refused in one line when the file cannot be written."""
    writing(verb, path, lambda: path.write_text(text))


def tracker_records(given: str) -> list[dict[str, Any]]:
    """The records of a tracker's CSV, refused when the file is missing, not text, not a
    tracker's records (missing columns, a row without symmetry, layer or step) or empty."""
    from symmech.viz.plots import read_records_csv

    path = Path(given)
    call = f"symmech plot {given!r}"
    if not path.is_file():
        problem = "this is a folder" if path.is_dir() else "no such file"
        raise SymmechError(
            explain(call, problem, "give the CSV a tracker wrote (tracker.to_csv(path))")
        )
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        records = read_records_csv(path)
    except UnicodeDecodeError:
        raise SymmechError(
            explain(call, "the file is not UTF-8 text", "give a tracker's CSV")
        ) from None
    except (csv.Error, ValueError, OSError) as err:
        raise SymmechError(
            explain(call, f"cannot read it as CSV: {one_line(err)}", "give a tracker's CSV")
        ) from None
    _check_records(call, header, records)
    return records


def _check_records(call: str, header: Sequence[str], records: list[dict[str, Any]]) -> None:
    missing = [c for c in RECORD_COLUMNS if c not in header]
    if missing:
        raise SymmechError(
            explain(
                call,
                f"not a tracker's records: no column {', '.join(missing)} "
                f"(the header is {', '.join(header[:8]) or 'empty'})",
                "give the CSV written by tracker.to_csv(path)",
            )
        )
    if not records:
        raise SymmechError(
            explain(call, "the CSV holds no records (a header only)", "track at least one step")
        )
    observed = [rec.get("observed") for rec in records]
    if not any(isinstance(v, (int, float)) and math.isfinite(v) for v in observed):
        raise SymmechError(
            explain(
                call,
                f"no record has a finite observed value ({len(records)} records): nothing to plot",
                "give the CSV written by tracker.to_csv(path)",
            )
        )
    for number, rec in enumerate(records, start=1):
        step = rec.get("step")
        bad_step = not isinstance(step, (int, float)) or not math.isfinite(step)
        if bad_step or not rec.get("symmetry") or not rec.get("layer"):
            raise SymmechError(
                explain(
                    call,
                    f"record {number} is not a tracker's (step={rec.get('step')!r}, "
                    f"symmetry={rec.get('symmetry')!r}, layer={rec.get('layer')!r})",
                    "give the CSV written by tracker.to_csv(path)",
                )
            )
