"""The ``symmech`` command.

    symmech list                          built-in symmetries and the spec files in derivations/
    symmech derive SPEC... [--json]       readable derivation (or JSON for other tools)
    symmech latex SPEC -o FILE.tex        one LaTeX document
    symmech latex --all [--check]         refresh (or check) every derivations/*.tex
    symmech generate SPEC... -o DIR       generated PyTorch trackers (--check: fail when stale)
    symmech demo [...]                    train on digits and compare theory with training
    symmech detect --model NAME           detected symmetries of a model
    symmech plot records.csv -o out.png   plot a tracker's CSV (theory dashed, observed solid)

SPEC is a built-in name (``symmech list``) or the path of a spec file.

A mistake in what the command is given (a spec file that fails to run or declares a malformed
symmetry, an unknown spec, an output path in a missing folder, a CSV that is not a tracker's
records) is reported in one line, ``error: ...``, with exit status 2; argparse's usage errors
also exit with 2. ``symmech list`` lists every spec file it can load and marks each one it
cannot with the reason, then exits with 2 when any was refused. A failure that is not a user
mistake is a bug: it is reported in one line with exit status 1 (set ``SYMMECH_TRACEBACK=1`` to
see the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from symmech.spec.declare import Symmetry, check_unique_names, load_spec

from .cli_checks import one_line, output_file, output_folder, tracker_records, write_text, writing
from .derivation import derive
from .errors import SymmechError, explain
from .spec import library

DEFAULT_DERIVATIONS = Path("derivations")
DEFAULT_GENERATED = Path("generated")


def project_folder(given: str, default: Path, verb: str) -> Path:
    """The folder ``given`` names; when it is the default and not here, the repository's own.

    The repository is the nearest parent of the working directory that holds both
    ``derivations/`` and ``generated/`` beside a ``pyproject.toml``, else the checkout this
    package was installed from (an editable install). Refuses, naming both, when neither has it.
    """
    path = Path(given)
    if path.is_dir() or path != default:
        return path
    here = Path.cwd().resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[1]]
    for root in candidates:
        if (
            all((root / d).is_dir() for d in ("derivations", "generated"))
            and (root / "pyproject.toml").is_file()
        ):
            return root / default
    raise SymmechError(
        f"symmech {verb}: no {default}/ folder in {here} or its parents, and this symmech was not "
        f"installed from a checkout that has one; run it in the repository or pass the folder "
        f"explicitly (--dir for spec files, -o for generated code)"
    )


def specs_in(directory: Path, verb: str) -> list[Path]:
    """The spec files of ``directory``; an empty folder is refused (a check of nothing passes)."""
    paths = spec_files(directory)
    if not paths:
        raise SymmechError(
            f"symmech {verb}: no spec files (*.py) in {directory}/; pass --dir with the folder "
            f"that holds them"
        )
    return paths


def resolve(spec: str) -> list[Symmetry]:
    """A built-in name, a spec file path, or the stem of a file in ./derivations."""
    if spec in library.BUILTIN:
        return [library.BUILTIN[spec]()]
    path = Path(spec)
    if path.suffix != ".py" and (DEFAULT_DERIVATIONS / f"{spec}.py").is_file():
        path = DEFAULT_DERIVATIONS / f"{spec}.py"
    if path.is_file():
        return load_spec(path)
    known = ", ".join(sorted(library.BUILTIN))
    raise SymmechError(f"symmech: unknown spec {spec!r}: not a built-in ({known}) and no such file")


def spec_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.py") if not p.name.startswith("_"))


def _cmd_list(args: argparse.Namespace) -> int:
    print("built-in symmetries:")
    for name, make in library.BUILTIN.items():
        print(f"  {name:28s} {make().description}")
    directory = Path(args.dir)
    if not directory.is_dir():
        if args.dir == str(DEFAULT_DERIVATIONS):
            return 0  # no spec files here: the built-ins are the whole list
        raise SymmechError(explain(f"symmech list --dir {args.dir!r}", "no such folder"))
    print(f"spec files in {directory}/:")
    refused, owner = [], {}
    for path in spec_files(directory):
        try:
            symmetries = load_spec(path)
            for s in symmetries:
                if s.name in owner:
                    raise SymmechError(
                        f"the symmetry {s.name!r} is also declared in {owner[s.name]}"
                    )
        except SymmechError as err:
            print(f"  {path.name:28s} REFUSED: {one_line(err)}")
            refused.append(path.name)
            continue
        owner.update((s.name, path.name) for s in symmetries)
        print(f"  {path.name:28s} {', '.join(s.name for s in symmetries)}")
    if refused:
        raise SymmechError(
            f"symmech list: {len(refused)} spec file(s) in {directory}/ refused: "
            f"{', '.join(refused)} (the reasons are listed above)"
        )
    return 0


def _cmd_derive(args: argparse.Namespace) -> int:
    derivations = [derive(s) for spec in args.specs for s in resolve(spec)]
    if args.json:
        print(json.dumps([d.dynamics.to_json() for d in derivations], indent=2, ensure_ascii=False))
    else:
        print("\n\n".join(d.summary() for d in derivations))
    return 0


def latex_for_file(path: Path) -> str:
    from symmech.export.latex import document_to_latex

    return document_to_latex([derive(s) for s in load_spec(path)])


def _cmd_latex(args: argparse.Namespace) -> int:
    from symmech.export.latex import document_to_latex

    if args.all:
        if args.specs or args.output:
            raise SymmechError(
                "symmech latex --all: writes each .tex beside its spec file; "
                "give --all or SPEC (with -o), not both"
            )
        stale = []
        for path in specs_in(
            project_folder(args.dir, DEFAULT_DERIVATIONS, "latex --all"), "latex --all"
        ):
            target = path.with_suffix(".tex")
            text = latex_for_file(path)
            if args.check:
                if not target.is_file() or target.read_text() != text:
                    stale.append(str(target))
            else:
                write_text(target, text, "latex --all")
                print(f"wrote {target}")
        if stale:
            print("stale LaTeX (run `symmech latex --all`): " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    if not args.specs:
        raise SymmechError("symmech latex: give SPEC (or --all)")
    if args.check:
        raise SymmechError("symmech latex --check: checks the .tex files of --all; add --all")
    output = output_file(args.output, "latex") if args.output else None
    symmetries = [s for spec in args.specs for s in resolve(spec)]
    check_unique_names(symmetries, "symmech latex")
    text = document_to_latex([derive(s) for s in symmetries])
    if output:
        write_text(output, text, "latex")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from symmech.codegen.render import check_generated, write_generated

    verb = "generate --check" if args.check else "generate"
    if args.specs:
        specs = args.specs
    else:
        specs = [
            str(p) for p in specs_in(project_folder(args.dir, DEFAULT_DERIVATIONS, verb), verb)
        ]
    symmetries = [s for spec in specs for s in resolve(spec)]
    check_unique_names(symmetries, f"symmech {verb}")
    output = output_folder(
        project_folder(args.output, DEFAULT_GENERATED, verb)
        if not args.specs
        else Path(args.output),
        verb,
    )
    if args.check:
        stale = check_generated(symmetries, output)
        if stale:
            print(
                "stale generated code (run `symmech generate`): " + ", ".join(stale),
                file=sys.stderr,
            )
            return 1
        print(f"{len(symmetries)} generated modules in {output}/ are up to date")
        return 0
    for path in writing(verb, output, lambda: write_generated(symmetries, output)):
        print(f"wrote {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from symmech.demo.run import run_demo

    return run_demo(args)


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        from symmech.viz.plots import plot_errors, plot_records
    except ImportError as err:
        raise SymmechError(
            f"symmech plot: needs matplotlib ({one_line(err)}); pip install 'symmech[viz]'"
        ) from None
    out = output_file(args.output, "plot")
    errors = output_file(args.errors, "plot", "--errors") if args.errors else None
    records = tracker_records(args.csv)
    writing("plot", out, lambda: plot_records(records, out, title=args.title))
    print(f"wrote {out}")
    if errors:
        writing("plot", errors, lambda: plot_errors(records, errors))
        print(f"wrote {errors}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    from symmech.demo.run import detect_command

    return detect_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symmech", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list built-in symmetries and spec files")
    p.add_argument("--dir", default=str(DEFAULT_DERIVATIONS))
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("derive", help="derive and print")
    p.add_argument("specs", nargs="+")
    p.add_argument(
        "--json", action="store_true", help="all laws, κ, J, c, data terms, closure as JSON"
    )
    p.set_defaults(func=_cmd_derive)

    p = sub.add_parser("latex", help="export LaTeX")
    p.add_argument("specs", nargs="*")
    p.add_argument("-o", "--output")
    p.add_argument("--all", action="store_true", help="refresh every .tex beside the spec files")
    p.add_argument("--check", action="store_true", help="with --all: fail when a .tex is stale")
    p.add_argument("--dir", default=str(DEFAULT_DERIVATIONS))
    p.set_defaults(func=_cmd_latex)

    p = sub.add_parser("generate", help="generate PyTorch trackers")
    p.add_argument("specs", nargs="*", help="default: every spec file in derivations/")
    p.add_argument("-o", "--output", default=str(DEFAULT_GENERATED))
    p.add_argument("--check", action="store_true", help="fail when a generated file is stale")
    p.add_argument("--dir", default=str(DEFAULT_DERIVATIONS))
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("demo", help="train on digits and compare theory with training")
    try:
        from symmech.demo.options import add_demo_arguments
    except ImportError:  # pragma: no cover - the demo is optional while it is being built
        add_demo_arguments = None
    if add_demo_arguments is not None:
        add_demo_arguments(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("plot", help="plot a tracker's CSV: observed solid, theory dashed")
    p.add_argument("csv")
    p.add_argument("-o", "--output", default="theory_vs_observed.png")
    p.add_argument(
        "--errors", default=None, help="also write the relative errors per law to this PNG"
    )
    p.add_argument("--title", default=None)
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("detect", help="print the symmetries detected in a model")
    p.add_argument("--model", default="vgg-tiny-bn")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=_cmd_detect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a user mistake is one line ``error: ...`` and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SymmechError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not a user mistake: still one line unless asked
        if os.environ.get("SYMMECH_TRACEBACK"):
            raise
        print(
            f"error: internal error in symmech {args.command}: {type(err).__name__}: "
            f"{one_line(err)} (a bug; SYMMECH_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
