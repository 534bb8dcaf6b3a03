"""Errors the user can fix, and how any error is put on one line."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


class DataError(UserError):
    """The data set cannot be loaded (missing, unreadable, no download): every job of a sweep
    over the same data would fail alike, so a sweep stops at the first."""


def one_line(e: BaseException) -> str:
    """An exception and its causes as one line, without Hydra's or OmegaConf's boilerplate."""
    # Here, not at the top: the averaging core raises UserError without importing OmegaConf.
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    parts: list[str] = []
    seen: BaseException | None = e
    while seen is not None:
        text = str(seen)
        if isinstance(seen, MissingMandatoryValue) and getattr(seen, "full_key", None):
            text = (f"{seen.full_key} has no value: set it on the command line "
                    f"({seen.full_key}=...)")
        elif isinstance(seen, OmegaConfBaseException):
            # OmegaConf appends full_key/object_type lines; the first line names the problem.
            key = getattr(seen, "full_key", None)
            text = text.splitlines()[0] if text else type(seen).__name__
            if key and key not in text:
                text += f" (key: {key})"
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if any(ln.startswith("Config search path") for ln in lines):
            lines = lines[:[ln.startswith("Config search path") for ln in lines].index(True)]
        lines = [ln for ln in lines if not ln.startswith("Set the environment variable")]
        chunk = " ".join(lines)
        if chunk and chunk not in parts:
            parts.append(chunk)
        seen = seen.__cause__
    return ": ".join(parts) or type(e).__name__
