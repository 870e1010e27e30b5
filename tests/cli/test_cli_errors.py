"""Each user mistake gets one line ``error: ...`` on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

HEADER = """
from symmech import Block, Constant, Symmetry, alpha, ones
theta = Block("theta")
"""


def _spec(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(HEADER + body).lstrip())
    return path


def _refused(outcome, *patterns: str) -> str:
    """The one error line of a refused command, checked against ``patterns`` (regexes)."""
    import re

    assert outcome.code != 0, outcome
    lines = outcome.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.err
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


# -- spec files ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, patterns",
    [
        ("SYMMETRY = Symmetry('s', {theta: alpha * theta)\n", [r"bad.py:3: SyntaxError"]),
        (
            "SYMMETRY = Symmetry('s', {theta: alpha * Theta})\n",
            [r"bad.py:3 \(.*NameError: name 'Theta'"],
        ),
        ("from symmech import nothing_here\n", [r"bad.py:3 \(.*ImportError: cannot import name"]),
        ("SYMMETRY = {}['key']\n", [r"bad.py:3 \(.*KeyError: 'key'"]),
        (
            "import sympy\nSYMMETRY = Symmetry('s', {theta: alpha * sympy.Symbol('beta') * theta}, identity=1)\n",
            [r"bad.py:4", r"free symbol 'beta' besides α"],
        ),
        (
            "SYMMETRY = Symmetry('s', {theta: theta + alpha})\n",
            [r"bad.py:3", "a scalar added to the matrix block 'theta'"],
        ),
        (
            "w = Block('theta', shape=(2, 2))\nSYMMETRY = Symmetry('s', {theta: alpha * theta, w: alpha * w}, identity=1)\n",
            [r"bad.py:4", "two different matrices are both called 'theta'"],
        ),
        ("SYMMETRIES = []\n", ["SYMMETRIES is empty"]),
        ("SYMMETRY = 'scale'\n", ["'scale' is not a symmech.Symmetry"]),
        (
            "S = Symmetry('s', {theta: alpha * theta}, identity=1)\n",
            ["neither SYMMETRY nor SYMMETRIES"],
        ),
        (
            "SYMMETRY = Symmetry('../x', {theta: alpha * theta}, identity=1)\n",
            ["the name '../x' is not a Python identifier"],
        ),
    ],
    ids=[
        "syntax",
        "name",
        "import",
        "exception",
        "free_symbol",
        "scalar_plus_block",
        "same_name",
        "empty",
        "wrong_type",
        "neither",
        "unsafe_name",
    ],
)
def test_bad_spec_file(cli, tmp_path: Path, body: str, patterns: list[str]) -> None:
    path = _spec(tmp_path, "bad.py", body)
    for argv in (
        ["derive", str(path)],
        ["latex", str(path)],
        ["generate", str(path), "-o", str(tmp_path / "gen")],
    ):
        line = _refused(cli(argv), r"^error: load_spec\('.*bad.py'\): ", *patterns)
        assert str(path) in line  # names the file
    assert not (tmp_path / "gen").exists() or not any((tmp_path / "gen").iterdir())


def test_unsafe_name_writes_nothing_outside_the_output_folder(cli, tmp_path: Path) -> None:
    path = _spec(
        tmp_path,
        "escape.py",
        "SYMMETRY = Symmetry('../escaped', {theta: alpha * theta}, identity=1)\n",
    )
    (tmp_path / "out").mkdir()
    _refused(cli(["generate", str(path), "-o", str(tmp_path / "out")]), "not a Python identifier")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["escape.py", "out"]


def test_two_symmetries_of_one_name_would_overwrite_each_other(cli, tmp_path: Path) -> None:
    twin = _spec(
        tmp_path, "twin.py", "SYMMETRY = Symmetry('scale', {theta: alpha**2 * theta}, identity=1)\n"
    )
    out = tmp_path / "gen"
    _refused(
        cli(["generate", "scale", str(twin), "-o", str(out)]), r"two symmetries are named 'scale'"
    )
    assert not out.exists()
    _refused(cli(["latex", "scale", str(twin)]), r"two symmetries are named 'scale'")


# -- output paths --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, pattern",
    [
        (
            ["latex", "scale", "-o", "{missing}/x.tex"],
            r"symmech latex -o '.*missing/x.tex': the folder .*missing does not exist",
        ),
        (
            ["latex", "scale", "-o", "{file}/x.tex"],
            r"symmech latex -o .*: .*afile is a file, not a folder",
        ),
        (["latex", "scale", "-o", "{tmp}"], r"symmech latex -o .*: this is a folder"),
        (
            ["latex", "scale", "-o", "/proc/symmech-test.tex"],
            r"symmech latex: cannot write /proc/symmech-test.tex",
        ),
        (
            ["generate", "scale", "-o", "{missing}/a/b"],
            r"symmech generate -o .*: neither the folder nor its parent",
        ),
        (
            ["generate", "scale", "-o", "{file}"],
            r"symmech generate -o .*afile': this is a file, not a folder",
        ),
        (
            ["generate", "scale", "-o", "/proc/symmech-test"],
            r"symmech generate: cannot write /proc/symmech-test",
        ),
        (
            ["plot", "{csv}", "-o", "{missing}/p.png"],
            r"symmech plot -o .*: the folder .*missing does not exist",
        ),
        (
            ["plot", "{csv}", "--errors", "{file}/e.png"],
            r"symmech plot --errors .*: .*afile is a file",
        ),
    ],
)
def test_output_paths(cli, tmp_path: Path, argv: list[str], pattern: str) -> None:
    (tmp_path / "afile").write_text("x")
    csv = tmp_path / "r.csv"
    csv.write_text("step,t,symmetry,layer,group,observed\n0,0,scale,l,0,1.0\n")
    names = {
        "missing": tmp_path / "missing",
        "file": tmp_path / "afile",
        "tmp": tmp_path,
        "csv": csv,
    }
    argv = [a.format(**names) for a in argv]
    _refused(cli(argv), pattern)
    assert not (tmp_path / "missing").exists()


def test_generate_makes_one_missing_folder_level(cli, tmp_path: Path) -> None:
    outcome = cli(["generate", "scale", "-o", str(tmp_path / "new")])
    assert outcome.code == 0 and (tmp_path / "new" / "scale.py").is_file(), outcome


# -- symmech plot --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, pattern",
    [
        (None, "no such file"),
        (bytes(range(256)) * 4, "the file is not UTF-8 text"),
        (
            b"a,b,c\n1,2,3\n",
            r"not a tracker's records: no column step, symmetry, layer, observed \(the header is a, b, c\)",
        ),
        (b"", r"not a tracker's records: .*the header is empty"),
        (b"step,t,symmetry,layer,group,observed\n", r"the CSV holds no records \(a header only\)"),
        (
            b"step,t,symmetry,layer,group,observed\n0,0,scale,,0,1\n",
            r"record 1 is not a tracker's .*layer=''",
        ),
        (
            b"step,t,symmetry,layer,group,observed\n0,0,s,l,0,1\nnan,0,s,l,0,1\n",
            r"record 2 is not a tracker's \(step='nan'",
        ),
        (
            b"step,symmetry,layer,observed\n0,s,l,1\x00\n",
            r"no record has a finite observed value \(1 records\)",
        ),
        (
            b"step,symmetry,layer,observed\n0,s,l,1" + b"0" * 200_000 + b"\n",
            r"cannot read it as CSV: field larger than field limit",
        ),
    ],
    ids=[
        "missing",
        "binary",
        "other_csv",
        "empty_file",
        "header_only",
        "no_layer",
        "bad_step",
        "nul",
        "huge_field",
    ],
)
def test_plot_refuses_what_is_not_a_trackers_records(cli, tmp_path: Path, content, pattern) -> None:
    path = tmp_path / "records.csv"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "plot.png"
    _refused(
        cli(["plot", str(path), "-o", str(out)]),
        rf"^error: symmech plot '.*records.csv': {pattern}",
    )
    assert not out.exists()  # no blank figure


def test_plot_refuses_a_folder(cli, tmp_path: Path) -> None:
    _refused(cli(["plot", str(tmp_path), "-o", str(tmp_path / "p.png")]), "this is a folder")


# -- symmech list --------------------------------------------------------------------------------
def test_list_marks_the_bad_spec_and_lists_the_others(cli, tmp_path: Path) -> None:
    for name in ("scale.py", "rescale.py"):
        (tmp_path / name).write_text((ROOT / "derivations" / name).read_text())
    _spec(tmp_path, "broken.py", "SYMMETRY = Symmetry('b', {theta: alpha * beta * theta})\n")
    _spec(
        tmp_path,
        "zz_twin.py",
        "SYMMETRY = Symmetry('scale', {theta: alpha**3 * theta}, identity=1)\n",
    )
    outcome = cli(["list", "--dir", str(tmp_path)])
    assert outcome.code == 2
    lines = {line.split()[0]: line for line in outcome.out.splitlines() if line.startswith("  ")}
    assert lines["scale.py"].split()[1:] == ["scale"] and lines["rescale.py"].split()[1:] == [
        "rescale"
    ]
    assert (
        "REFUSED:" in lines["broken.py"]
        and "NameError: name 'beta' is not defined" in lines["broken.py"]
    )
    assert "REFUSED: the symmetry 'scale' is also declared in scale.py" in lines["zz_twin.py"]
    _refused(outcome, r"symmech list: 2 spec file\(s\) in .* refused: broken.py, zz_twin.py")


def test_list_of_good_specs_and_of_a_missing_folder(cli, tmp_path: Path) -> None:
    outcome = cli(["list", "--dir", str(ROOT / "derivations")])
    assert outcome.code == 0 and outcome.err == "" and "REFUSED" not in outcome.out
    assert "linear_pair.py" in outcome.out
    _refused(cli(["list", "--dir", str(tmp_path / "none")]), "no such folder")


# -- names and arguments -------------------------------------------------------------------------
def test_unknown_spec_name(cli) -> None:
    _refused(
        cli(["derive", "scael"]),
        r"unknown spec 'scael': not a built-in \(.*scale.*\) and no such file",
    )


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["derive", "scale", "--jsn"], "unrecognized arguments: --jsn"),
        ([], "required: command"),
        (["derive"], "required: specs"),
    ],
)
def test_argparse_usage_errors(cli, argv: list[str], pattern: str) -> None:
    outcome = cli(argv)
    assert outcome.code == 2 and outcome.err.startswith("usage: symmech") and pattern in outcome.err


def test_latex_flags_that_do_not_go_together(cli) -> None:
    _refused(cli(["latex", "scale", "--check"]), r"latex --check: .* add --all")
    _refused(cli(["latex", "--all", "scale"]), r"give --all or SPEC \(with -o\), not both")
    _refused(cli(["latex"]), r"give SPEC \(or --all\)")


def test_a_good_command_still_succeeds(cli, tmp_path: Path) -> None:
    out = tmp_path / "scale.tex"
    outcome = cli(["latex", "scale", "-o", str(out)])
    assert outcome.code == 0 and outcome.err == "" and out.read_text().startswith("\\documentclass")


# -- a real process ------------------------------------------------------------------------------
def test_no_traceback_reaches_the_terminal(tmp_path: Path) -> None:
    """Through ``python -m symmech``: a broken spec and a header-only CSV each give one line."""
    bad = _spec(tmp_path, "bad.py", "SYMMETRY = Symmetry('s', {theta: alpha * beta * theta})\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("step,t,symmetry,layer,group,observed\n")
    env = {k: v for k, v in os.environ.items() if k != "SYMMECH_TRACEBACK"}
    for argv in (["derive", str(bad)], ["plot", str(empty), "-o", str(tmp_path / "p.png")]):
        proc = subprocess.run(
            [sys.executable, "-m", "symmech", *argv],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
        assert proc.returncode == 2, proc
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "p.png").exists()
