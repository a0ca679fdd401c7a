"""``seqtp.tasks`` in a source checkout that is used without installing it (``PYTHONPATH=<repo>``, as on the GPU
machines).

Installs map the folder ``tasks/`` of the repository to the package ``seqtp.tasks`` (``package-dir`` in
``pyproject.toml``); a bare checkout has no such mapping, so ``import seqtp.tasks`` would fail there. When the
package cannot be found and the folder ``tasks/`` sits beside ``seqtp/``, this module registers that folder as
``seqtp.tasks`` (its submodules are then found through its ``__path__``). Anywhere else it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

NAME = "seqtp.tasks"
FOLDER = Path(__file__).resolve().parents[1] / "tasks"  # the repository root's tasks/ in a checkout


def register() -> None:
    """Register ``FOLDER`` as ``seqtp.tasks`` unless that package is importable already (installed or registered).

    The package module is created here but executed on its first import, so that importing ``seqtp`` does not
    import the tasks.
    """
    if NAME in sys.modules or importlib.util.find_spec(NAME) is not None:
        return
    if not (FOLDER / "__init__.py").is_file():
        return
    sys.meta_path.append(_CheckoutFinder())


class _CheckoutFinder:
    """A meta-path finder for exactly ``seqtp.tasks`` -> ``FOLDER/__init__.py`` (submodules go through the
    package's ``__path__`` = ``[FOLDER]``, by the ordinary path finder)."""

    @staticmethod
    def find_spec(fullname: str, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(NAME, FOLDER / "__init__.py",
                                                      submodule_search_locations=[str(FOLDER)])
