"""The generated module of a spec: the committed file when it matches, else rendered once.

``generated/<name>.py`` beside the package (a source checkout, or an editable install of one)
is imported when its ``FINGERPRINT`` equals :func:`symmech.codegen.render.spec_fingerprint`
of the spec, so the code a reviewer reads is the code that runs. Any other spec (a user's, or
one whose committed file is stale or absent, as in an installed wheel) is rendered from its
derivation and executed; the text is the same as ``symmech generate`` writes, unformatted.
Either way the module is registered in ``sys.modules`` (``torch.compile`` and pickling import
functions by their module's name).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

from symmech.codegen.render import render_module, spec_fingerprint
from symmech.derivation import Derivation

#: Where ``symmech generate`` writes the committed modules, in a source checkout.
COMMITTED = Path(__file__).resolve().parents[2] / "generated"
_FINGERPRINT = re.compile(r'^FINGERPRINT = "([0-9a-f]+)"$', re.MULTILINE)
_MODULES: dict[str, types.ModuleType] = {}


def committed_path(d: Derivation, directory: Path = COMMITTED) -> Path | None:
    """The committed module of this spec when its fingerprint matches, else None."""
    path = directory / f"{d.name}.py"
    if not path.is_file():
        return None
    found = _FINGERPRINT.search(path.read_text(encoding="utf-8"))
    return path if found and found.group(1) == spec_fingerprint(d.symmetry) else None


def _register(name: str, module: types.ModuleType) -> types.ModuleType:
    sys.modules[name] = module
    _MODULES[name] = module
    return module


def generated_module(d: Derivation) -> types.ModuleType:
    """The generated module of a derivation, loaded once per spec fingerprint."""
    fingerprint = spec_fingerprint(d.symmetry)
    name = f"symmech_generated_{d.name}_{fingerprint[:12]}"
    module = _MODULES.get(name)
    if module is None:
        path = committed_path(d)
        if path is not None:
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = types.ModuleType(name)
            module.__file__ = f"<generated {d.name}>"
            text = render_module(d, formatted=False)
            exec(compile(text, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our template
        _register(name, module)
    return module
