"""Time the symbolic pipeline for every symmetry of every spec in ``derivations/``.

    python benchmarks/derive_time.py [--spec-dir derivations] [--only NAME]

Each symmetry is measured in fresh Python processes, so no SymPy cache (or functools cache)
carries over from another symmetry:

* process 1 (one derivation object, stages in order, each timed on its own):
  (a) ``symmech.derive(sym)``                       geometry + Noether    target < 1 s
  (b) ``d.dynamics.laws`` + ``d.dynamics.to_json()`` all laws, on that d  target < 2 s
      (a symmetry with no conserved quantity has no laws: only ``to_json()`` is timed)
  (c) ``render_module(d)``                          codegen, laws already derived
  then the three stages again on a new ``derive(sym)`` in the same process ("warm": SymPy's
  caches filled);
* process 2: ``render_module(derive(sym))`` from nothing (derive + laws + codegen, cold).

Python start-up and ``import symmech`` are not timed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DERIVE_TARGET_S = 1.0
LAWS_TARGET_S = 2.0


def _worker(spec: str, index: int, mode: str) -> dict[str, Any]:
    """Run inside a fresh process: time the stages for one symmetry and return the figures."""
    import symmech
    from symmech.codegen.render import render_module

    sym = symmech.load_spec(spec)[index]
    out: dict[str, Any] = {"name": sym.name}
    if mode == "scratch":
        start = time.perf_counter()
        render_module(symmech.derive(sym))
        out["codegen_scratch"] = time.perf_counter() - start
        return out
    for label in ("cold", "warm"):
        start = time.perf_counter()
        d = symmech.derive(sym)
        t_derive = time.perf_counter()
        dyn = d.dynamics
        # a symmetry without a conserved quantity has no laws; to_json() still reports why
        laws = dyn.laws if dyn.closes else {}
        dyn.to_json()
        t_laws = time.perf_counter()
        render_module(d)
        t_codegen = time.perf_counter()
        out[label] = {
            "derive": t_derive - start,
            "laws": t_laws - t_derive,
            "codegen": t_codegen - t_laws,
            "closes": bool(dyn.closes),
            "n_laws": len(laws),
        }
    return out


def _run_worker(spec: Path, index: int, mode: str) -> dict[str, Any]:
    """Run :func:`_worker` in a fresh interpreter (this file with ``--worker``)."""
    cmd = [sys.executable, __file__, "--worker", str(spec), str(index), mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def _count_symmetries(spec: Path) -> list[str]:
    import symmech

    return [s.name for s in symmech.load_spec(spec)]


def _mark(value: float, target: float | None) -> str:
    if target is None:
        return f"{value:8.3f}  "
    return f"{value:8.3f} {'✓' if value < target else '✗'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec-dir", type=Path, default=ROOT / "derivations")
    parser.add_argument("--only", default=None, help="only spec files whose stem contains this")
    parser.add_argument(
        "--worker", nargs=3, metavar=("SPEC", "INDEX", "MODE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        spec, index, mode = args.worker
        print("RESULT " + json.dumps(_worker(spec, int(index), mode)), flush=True)
        return

    specs = sorted(p for p in args.spec_dir.glob("*.py") if not p.name.startswith("_"))
    if args.only:
        specs = [p for p in specs if args.only in p.stem]
    header = (
        f"{'spec':30s} {'symmetry':26s} {'derive s':>10s} {'laws s':>10s} {'codegen s':>10s}"
        f" | {'warm: derive':>12s} {'laws':>7s} {'codegen':>8s} | {'codegen from nothing s':>22s}"
    )
    print(
        f"symbolic pipeline per symmetry, fresh process each (python {sys.version.split()[0]}); "
        f"targets: derive < {DERIVE_TARGET_S:g} s, laws < {LAWS_TARGET_S:g} s (✓ met, ✗ missed)",
        flush=True,
    )
    print(header)
    print("-" * len(header), flush=True)
    totals = {"derive": 0.0, "laws": 0.0, "codegen": 0.0}
    misses: list[str] = []
    n = 0
    for spec in specs:
        try:
            names = _count_symmetries(spec)
        except Exception as err:  # a broken spec is reported, the others still run
            print(f"{spec.name:30s} could not load: {type(err).__name__}: {err}", flush=True)
            continue
        for index, name in enumerate(names):
            chain = _run_worker(spec, index, "chain")
            scratch = _run_worker(spec, index, "scratch")
            if "error" in chain:
                print(f"{spec.name:30s} {name:26s} failed: {chain['error']}", flush=True)
                continue
            cold, warm = chain["cold"], chain["warm"]
            n += 1
            for k in totals:
                totals[k] += cold[k]
            if cold["derive"] >= DERIVE_TARGET_S:
                misses.append(f"{name}: derive {cold['derive']:.2f} s")
            if cold["laws"] >= LAWS_TARGET_S:
                misses.append(f"{name}: laws {cold['laws']:.2f} s")
            scratch_s = (
                f"{scratch['codegen_scratch']:8.3f}"
                if "codegen_scratch" in scratch
                else f"failed: {scratch.get('error')}"
            )
            note = (
                "" if cold["closes"] else "  (no conserved quantity: laws column is to_json only)"
            )
            print(
                f"{spec.name:30s} {name:26s} {_mark(cold['derive'], DERIVE_TARGET_S):>10s} "
                f"{_mark(cold['laws'], LAWS_TARGET_S):>10s} {_mark(cold['codegen'], None):>10s}"
                f" | {warm['derive']:12.3f} {warm['laws']:7.3f} {warm['codegen']:8.3f} |"
                f" {scratch_s:>22s}{note}",
                flush=True,
            )
    print("-" * len(header))
    if n:
        print(
            f"{n} symmetries; cold totals: derive {totals['derive']:.2f} s, laws "
            f"{totals['laws']:.2f} s, codegen {totals['codegen']:.2f} s; targets missed: "
            + ("; ".join(misses) if misses else "none")
        )


if __name__ == "__main__":
    main()
