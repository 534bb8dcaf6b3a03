"""torch and torchvision must be a matching pair: a CPU torch beside a CUDA torchvision (or two
releases apart) fails inside torchvision's import with a long traceback ending in "operator
torchvision::nms does not exist". This names the installed versions and the pair to install.

Imports nothing of the project and not torchvision at module level, so that the entry point can
run it before anything else imports torchvision."""

from __future__ import annotations

import importlib.metadata
import re
from typing import Any

from swa_research.errors import UserError

__all__ = ["import_torchvision", "matching_torchvision", "pair_problem", "require_torch_pair"]

# torchvision's minor version is torch 2.x's minor + 15 (torch 2.4 - 0.19, 2.11 - 0.26,
# 2.14 - 0.29), the pairing in torchvision's README table.
_OFFSET = 15


def _release(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _build(version: str) -> str:
    """The local version label: 'cpu', 'cu126', ... ('' where the wheel has none)."""
    return version.partition("+")[2]


def matching_torchvision(torch_version: str) -> str | None:
    """The torchvision release series that goes with ``torch_version`` (e.g. '0.29')."""
    rel = _release(torch_version)
    if rel is None or rel[0] != 2:
        return None
    return f"0.{rel[1] + _OFFSET}"


def pair_problem(torch_version: str, torchvision_version: str | None,
                 import_error: BaseException | None) -> str | None:
    """One line naming what is wrong with the pair, or None when it works."""
    want = matching_torchvision(torch_version)
    install = (f"; install a matching pair, e.g. pip install torch=={torch_version.split('+')[0]} "
               f"torchvision=={want}.*" if want else "; install torch and torchvision from "
               "the same release (https://pytorch.org/get-started/locally/)")
    if torchvision_version is None:
        return f"torchvision is not installed (torch {torch_version})" + install
    mismatch = want is not None and _release(torchvision_version) is not None and \
        ".".join(map(str, _release(torchvision_version) or ())) != want
    builds = (_build(torch_version), _build(torchvision_version))
    other_build = all(builds) and builds[0] != builds[1]
    if import_error is None and not mismatch:
        return None
    why = []
    if mismatch:
        why.append(f"torchvision {torchvision_version} is not the release for torch "
                   f"{torch_version} (that is torchvision {want}.*)")
    if other_build:
        why.append(f"the two are different builds ({builds[0]} and {builds[1]})")
    if import_error is not None:
        first = (str(import_error).strip().splitlines() or [""])[0][:160]
        why.append(f"importing torchvision failed ({type(import_error).__name__}: {first})")
    return "; ".join(why) + install


def require_torch_pair(check_import: bool = True) -> None:
    """UserError when torchvision is not the installed torch's release (read from the
    packages' metadata: nothing imported), or with ``check_import`` cannot be imported beside it.
    A version skew that imports is reported too: it fails later, in a kernel. The command line
    checks the versions at its start (a language model never imports torchvision: 166 MiB);
    :func:`import_torchvision` checks the import where it is first needed."""
    import torch

    try:
        tv_version: str | None = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        tv_version = None
    error: BaseException | None = None
    if tv_version is not None and check_import:
        try:
            import torchvision  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any failure here is the install's
            error = e
    problem = pair_problem(torch.__version__, tv_version, error)
    if problem is not None:
        raise UserError(problem)


def import_torchvision() -> Any:
    """``torchvision``, imported where a run first needs it (CIFAR, torchvision's models); a
    failed import is the one-line UserError of :func:`require_torch_pair`, not a traceback."""
    try:
        import torchvision
    except Exception:  # noqa: BLE001 - said in one line below
        require_torch_pair()
        raise
    return torchvision
