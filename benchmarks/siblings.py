"""Load a sibling benchmark script by its file path (benchmarks/ is not a package).

Scripts share datasets, recipes and helpers (`generality.py`'s datasets, `compare.py`'s recipe
classifier). Each is loaded once, under the name ``bench_<name>``, and registered in
`sys.modules` before it runs: dataclasses resolve their module by name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent


def load(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module, loaded on the first call and reused after."""
    module_name = f"bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no benchmark script {name}.py in {HERE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module
