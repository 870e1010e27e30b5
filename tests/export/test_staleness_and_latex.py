"""Committed artifacts are fresh (generated/*.py, derivations/*.tex), the LaTeX compiles, and
``symmech derive --json`` is machine-readable.

Run from the repository root (``monkeypatch.chdir``): the CLI's defaults are the relative
folders ``derivations/`` and ``generated/``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from symmech.cli import main
from symmech.spec import library

ROOT = Path(__file__).resolve().parents[2]
TEX_FILES = sorted((ROOT / "derivations").glob("*.tex"))
GENERATED = sorted((ROOT / "generated").glob("*.py"))


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)
    return ROOT


def test_there_is_something_to_check():
    names = {p.stem for p in GENERATED}
    assert {"translation", "scale", "rescale", "quadratic_rescale", "linear_pair"} <= names
    assert {p.stem for p in TEX_FILES} >= names


def test_generated_code_is_up_to_date(at_root, capsys):
    assert main(["generate", "--check"]) == 0, capsys.readouterr().err


def test_latex_is_up_to_date(at_root, capsys):
    assert main(["latex", "--all", "--check"]) == 0, capsys.readouterr().err


SPEC_FILES = sorted((ROOT / "derivations").glob("*.py"))


@pytest.mark.parametrize("spec", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_latex_of_a_spec_is_its_committed_tex(spec, at_root, tmp_path, capsys):
    out = tmp_path / f"{spec.stem}.tex"
    assert main(["latex", str(spec), "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.read_text() == spec.with_suffix(".tex").read_text()


@pytest.mark.parametrize("spec", SPEC_FILES, ids=[p.stem for p in SPEC_FILES])
def test_latex_of_a_builtin_name_is_the_committed_tex(spec, at_root, tmp_path, capsys):
    """``symmech latex linear_pair`` (the built-in) matches derivations/linear_pair.tex."""
    if spec.stem not in library.BUILTIN:
        pytest.fail(f"{spec.name} has no built-in of the same name")
    out = tmp_path / f"{spec.stem}.tex"
    assert main(["latex", spec.stem, "-o", str(out)]) == 0, capsys.readouterr().err
    assert out.read_text() == spec.with_suffix(".tex").read_text()


def test_stale_generated_copy_is_detected(at_root, tmp_path, capsys):
    out = tmp_path / "generated"
    shutil.copytree(ROOT / "generated", out, ignore=shutil.ignore_patterns("__pycache__"))
    assert main(["generate", "--check", "-o", str(out)]) == 0  # an exact copy is fresh
    capsys.readouterr()

    target = out / "scale.py"
    target.write_text(target.read_text().replace("KAPPA = 2.0", "KAPPA = 2.5"))
    assert main(["generate", "--check", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "stale generated code" in err and str(target) in err
    assert str(out / "rescale.py") not in err  # only the modified file is named

    (out / "rescale.py").unlink()
    assert main(["generate", "--check", "-o", str(out)]) == 1
    assert str(out / "rescale.py") in capsys.readouterr().err


def test_stale_latex_copy_is_detected(at_root, tmp_path, capsys):
    d = tmp_path / "derivations"
    d.mkdir()
    for p in (ROOT / "derivations").iterdir():
        if p.suffix in (".py", ".tex"):
            shutil.copy(p, d / p.name)
    assert main(["latex", "--all", "--check", "--dir", str(d)]) == 0
    capsys.readouterr()
    target = d / "rescale.tex"
    target.write_text(target.read_text().replace(r"\lambda", r"\mu", 1))
    assert main(["latex", "--all", "--check", "--dir", str(d)]) == 1
    err = capsys.readouterr().err
    assert "stale LaTeX" in err and str(target) in err and "scale.tex," not in err


@pytest.mark.parametrize("tex", TEX_FILES, ids=[p.stem for p in TEX_FILES])
def test_latex_compiles(tex, tmp_path):
    exe = shutil.which("pdflatex")
    if exe is None:
        pytest.fail(
            "pdflatex is not installed: install TeX Live (CI does) to check the LaTeX exports"
        )
    proc = subprocess.run(
        [
            exe,
            "-interaction=nonstopmode",
            "-halt-on-error",
            f"-output-directory={tmp_path}",
            str(tex),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = proc.stdout[-3000:]
    assert proc.returncode == 0, f"pdflatex failed on {tex.name}:\n{log}"
    pdf = tmp_path / f"{tex.stem}.pdf"
    assert pdf.is_file() and pdf.stat().st_size > 1000
    assert "Undefined control sequence" not in proc.stdout


def _derive_json(capsys, spec: str) -> list[dict]:
    assert main(["derive", spec, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_derive_json_scale(at_root, capsys):
    (d,) = _derive_json(capsys, "scale")
    assert d["symmetry"] == "scale"
    assert d["closure"]["closes"] is True
    kappa = d.get("kappa", d["closure"].get("kappa"))
    assert str(kappa) == "2"
    assert {"Q", "r", "gJg", "uJu[sgd]", "uJb[sgd]"} <= set(d["data_terms"])
    assert d["data_terms"]["Q"] == "<theta, theta>/2"
    assert {"gradient_flow", "first_order", "second_order", "discrete"} <= set(d["laws"])


def test_derive_json_antisymmetric_pair_does_not_close(at_root, capsys):
    (d,) = _derive_json(capsys, "linear_pair_antisymmetric")
    assert d["closure"]["closes"] is False
    assert "antisymmetric" in d["closure"]["why"]


def test_derive_json_from_a_spec_file(at_root, capsys):
    (d,) = _derive_json(capsys, str(ROOT / "derivations" / "rescale.py"))
    assert d["symmetry"] == "rescale" and d["closure"]["closes"] is True
