"""Errors of the ``vtok-fast`` command line: one line on stderr, exit status 2, no traceback.

Shared by ``vtok_fast/cli.py`` and the subcommands it imports (``measure/demo.py``,
``measure/budget_cli.py``), which must not import the CLI module itself.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROG = "vtok-fast"


def error(message: str) -> int:
    """Print ``vtok-fast: error: MESSAGE`` (one line) on stderr; return exit status 2 (a usage
    error, as argparse's own)."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def warn(message: str) -> None:
    """Print ``vtok-fast: warning: MESSAGE`` (one line) on stderr."""
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def device_problem(device: str | None) -> str | None:
    """The error line for ``--device cuda`` on a machine without a CUDA device, else None."""
    if device != "cuda":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return "--device cuda: no CUDA device is available here (torch.cuda.is_available() is False); use --device cpu"


def chosen_device(device: str | None):
    """``torch.device`` of a ``--device`` value; without one, CUDA where available, else the CPU."""
    import torch

    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (``vtok-fast: error: ...``, no usage
    block) and exit 2; its subparsers are of this class too."""

    def error(self, message):  # noqa: D102 - argparse's hook
        sys.exit(error(message))


def _folder_problem(flag: str, folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (None: they can)."""
    if not folder.exists():
        return f"{flag}: the folder {str(folder)!r} does not exist"
    if not folder.is_dir():
        return f"{flag}: {str(folder)!r} is not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{flag}: the folder {str(folder)!r} is not writable"
    return None


def output_file_problem(flag: str, path) -> str | None:
    """Why ``path`` cannot be written as a file (None: it can): it is a folder, or its folder is
    missing, not a folder or not writable. Checked before a command starts its work."""
    path = Path(path)
    if path.is_dir():
        return f"{flag}: {str(path)!r} is a folder; give a file name"
    return _folder_problem(flag, path.parent)


def output_dir_problem(flag: str, path) -> str | None:
    """Why ``path`` cannot be used (or created) as a folder of output files (None: it can): it
    is a file, or the nearest existing folder above it is not a writable folder."""
    path = Path(path)
    if path.exists():
        return _folder_problem(flag, path)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return f"{flag}: {str(parent)!r} is a file, so the folder {str(path)!r} cannot be created"
    return _folder_problem(flag, parent)
