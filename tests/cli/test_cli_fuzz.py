"""Property: mutated spec files and argument lists never make the CLI raise or print a
traceback, and a refused input never exits 0.

Spec files: the shipped ``derivations/*.py`` with tokens deleted, duplicated, replaced, a name
renamed or the text cut short. Whether a mutant must be refused is decided here, independently of
``load_spec``: the text is run as plain Python, and it must define exactly one of ``SYMMETRY`` (a
Symmetry) or ``SYMMETRIES`` (a non-empty list or tuple of Symmetry objects of distinct names).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symmech import Symmetry

ROOT = Path(__file__).resolve().parents[2]
SPECS = {p.name: p.read_text() for p in sorted((ROOT / "derivations").glob("*.py"))}
TOKEN = re.compile(r"[A-Za-z_]\w*|\d+|\s+|.", re.S)
IDENT = re.compile(r"[A-Za-z_]\w*")
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _mutate(text: str, edits: list[tuple[str, int, int]]) -> str:
    for kind, i, j in edits:
        tokens = TOKEN.findall(text) or [""]
        a, b = i % len(tokens), j % len(tokens)
        if kind == "delete":
            del tokens[a]
        elif kind == "duplicate":
            tokens.insert(a, tokens[a])
        elif kind == "replace":
            tokens[a] = tokens[b]
        elif kind == "rename":
            names = sorted(set(IDENT.findall(text))) or ["x"]
            old, new = names[a % len(names)], ["beta", "theta", "alpha", "Blok", "_"][b % 5]
            tokens = [new if t == old else t for t in tokens]
        elif kind == "truncate":
            return "".join(tokens)[: a * len(text) // len(tokens)]
        text = "".join(tokens)
    return text


def _acceptable(text: str) -> bool:
    """Whether the text is a valid spec file, judged by running it as plain Python."""
    scope: dict = {"__name__": "fuzzed_spec"}
    try:
        exec(compile(text, "fuzzed_spec.py", "exec"), scope)
    except BaseException:  # noqa: BLE001 - any failure of the file is a refusal
        return False
    if ("SYMMETRY" in scope) == ("SYMMETRIES" in scope):
        return False
    found = scope.get("SYMMETRIES", [scope.get("SYMMETRY")])
    if "SYMMETRIES" in scope and not (isinstance(found, (list, tuple)) and found):
        return False
    if not all(isinstance(s, Symmetry) for s in found):
        return False
    return len({s.name for s in found}) == len(found)


EDIT = st.tuples(
    st.sampled_from(["delete", "duplicate", "replace", "rename", "truncate"]),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
)


@FUZZ
@given(name=st.sampled_from(sorted(SPECS)), edits=st.lists(EDIT, min_size=1, max_size=3))
def test_mutated_spec_files(cli, name: str, edits) -> None:
    text = _mutate(SPECS[name], edits)
    expected = _acceptable(text)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_text(text)
        listed = cli(["list", "--dir", folder])
        line = next(x for x in listed.out.splitlines() if x.startswith(f"  {name}"))
        if expected:
            assert listed.code == 0 and "REFUSED" not in line, (text, listed)
        else:
            assert listed.code == 2 and "REFUSED: " in line, (text, listed)
            assert listed.err.startswith("error: symmech list: 1 spec file(s)"), listed
        quick = name in ("scale.py", "translation.py")
        outcome = cli(["derive", str(path)]) if quick or not expected else None
    if outcome is None:  # a full derivation of the others takes a second or more
        return
    if expected:
        assert outcome.code == 0 or outcome.err.startswith("error: "), outcome
    else:
        assert outcome.code == 2 and outcome.err.startswith("error: load_spec("), outcome


# -- argument lists ------------------------------------------------------------------------------
VALID = [
    ["list"],
    ["list", "--dir", "mixed"],
    ["derive", "scale", "--json"],
    ["derive", "derivations/scale.py"],
    ["latex", "scale", "-o", "out.tex"],
    ["latex", "--all", "--check"],
    ["generate", "translation", "-o", "gen"],
    ["generate", "--check", "--dir", "derivations"],
    ["plot", "empty.csv", "-o", "p.png", "--errors", "e.png"],
]
WORDS = sorted({w for argv in VALID for w in argv}) + [
    "nosuch",
    "bad.py",
    "blob.bin",
    "missing/x.tex",
    "afile/x",
    "afile",
    "mixed",
    "--title",
    "",
    "-",
    "--",
]
#: Arguments that name something wrong wherever a command reads them as a spec or output.
BAD_SPECS = {"nosuch", "bad.py", "blob.bin", "missing/x.tex", "afile/x", "afile", "", "-", "mixed"}


def _sandbox(folder: Path) -> None:
    """A working directory with its own derivations/ and generated/: nothing leaves it."""
    (folder / "derivations").mkdir()
    (folder / "generated").mkdir()
    shutil.copy(ROOT / "derivations" / "scale.py", folder / "derivations" / "scale.py")
    (folder / "mixed").mkdir()
    shutil.copy(ROOT / "derivations" / "translation.py", folder / "mixed" / "translation.py")
    (folder / "mixed" / "bad.py").write_text("SYMMETRIES = []\n")
    (folder / "bad.py").write_text("from symmech import Block\nSYMMETRY = Block('x') + 1\n")
    (folder / "blob.bin").write_bytes(bytes(range(256)))
    (folder / "afile").write_text("not a folder")
    (folder / "empty.csv").write_text("step,t,symmetry,layer,group,observed\n")


def _must_refuse(argv: list[str]) -> bool:
    """Inputs that are surely wrong, judged from the words alone (False: no judgement)."""
    from symmech.cli import build_parser

    try:
        args, rest = build_parser().parse_known_args(argv)
    except SystemExit:
        return True
    if rest:
        return True
    if args.command in ("derive", "latex", "generate"):
        if any(s in BAD_SPECS for s in args.specs):
            return True
    if args.command == "plot":
        return True  # the only CSVs here are refused ones
    if args.command == "list":
        return args.dir != "derivations"  # mixed/ holds a bad spec; others do not exist
    return False


@FUZZ
@given(
    base=st.sampled_from(VALID),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["delete", "duplicate", "replace", "insert"]),
            st.integers(0, 99),
            st.sampled_from(WORDS),
        ),
        max_size=3,
    ),
)
def test_mutated_argument_lists(cli, base: list[str], edits) -> None:
    argv = list(base)
    for kind, i, word in edits:
        k = i % (len(argv) + 1)
        if kind == "insert" or not argv:
            argv.insert(k, word)
        elif kind == "delete":
            del argv[k % len(argv)]
        elif kind == "duplicate":
            argv.insert(k, argv[k % len(argv)])
        else:
            argv[k % len(argv)] = word
    if argv and argv[0] in ("demo", "detect"):
        return
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        _sandbox(Path(folder))
        os.chdir(folder)
        try:
            outcome = cli(argv)
        finally:
            os.chdir(here)
    if outcome.code != 0:
        last = outcome.err.strip().splitlines()[-1] if outcome.err.strip() else ""
        assert re.match(r"(error: |symmech( \w+)?: error: |stale )", last), outcome
    if _must_refuse(argv):
        assert outcome.code != 0, outcome
