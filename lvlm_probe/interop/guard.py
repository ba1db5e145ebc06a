"""A guard that stops third-party code from installing packages while it runs.

Some libraries install what they miss at run time: TransformerLens 4.3's bridge loader, when a
multimodal processor fails to load and ``import torchvision`` fails, runs
``uv pip install torchvision`` or ``python -m pip install torchvision``, which can replace the
installed torch with another build. Inside :func:`no_installs`, every attempt by any thread of the
process to start a package installer (``pip``/``uv``/``conda``/... ``install``, through
``subprocess``, ``os.system``, ``os.exec*``, ``os.spawn*`` or ``os.posix_spawn``) is refused before
the process starts, and the block raises :class:`PackageInstallError` naming the command.

The refusal is a Python audit hook (:func:`sys.addaudithook`): CPython raises the audit event of
every process launch before launching, whatever module made the call, and aborts the launch when a
hook raises. Audit hooks cannot be removed, so one hook is added on first use and stays inert
outside a :func:`no_installs` block.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import PackageInstallError

# Programs that install packages, and the subcommands that make them do it.
_INSTALLERS = {"pip", "uv", "uvx", "conda", "mamba", "micromamba", "poetry", "pipx",
               "easy_install", "pdm", "hatch"}
_VERBS = {"install", "add", "sync"}
# Launch events, and where each puts the command in its arguments (sys.audit's documented order).
_EVENTS = {"subprocess.Popen": 1, "os.system": 0, "os.exec": 1, "os.spawn": 2, "os.posix_spawn": 1}

_lock = threading.Lock()
_active = 0  # open no_installs blocks, in any thread
_blocked: list[str] = []  # commands refused since the outermost block opened
_hook_added = False


def installer_command(command: str | bytes | Sequence[Any]) -> str | None:
    """The command line if ``command`` runs a package installer, else None.

    Args:
        command: an argument list (as ``subprocess`` takes) or a shell string (as ``os.system``).

    Returns:
        The command as one string, or None when it installs nothing.

    Example:
        >>> installer_command(["python", "-m", "pip", "install", "torchvision"])
        'python -m pip install torchvision'
        >>> installer_command(["git", "status"]) is None
        True
    """
    if isinstance(command, (str, bytes, os.PathLike)):
        text = os.fsdecode(command)
        words = _split(text)
    else:
        words = [os.fsdecode(w) if isinstance(w, (bytes, os.PathLike)) else str(w) for w in command]
        text = " ".join(shlex.quote(w) for w in words)
    # a shell command (``sh -c "pip install x"``) carries the installer inside one argument
    words = [part for w in words for part in (_split(w) if any(c.isspace() for c in w) else [w])]
    names = [os.path.basename(w).lower() for w in words]
    # "pip3.11" and "pip.exe" are still pip; "-m pip" runs pip through an interpreter
    programs = {n.split(".exe")[0].rstrip("0123456789.") for n in names}
    if programs & _INSTALLERS and set(names) & _VERBS:
        return text
    return None


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # unbalanced quotes: still look at the words
        return text.split()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _active or event not in _EVENTS:
        return
    index = _EVENTS[event]
    command = args[index] if len(args) > index else None
    if command is None:
        return
    text = installer_command(command)
    if text is None:
        return
    with _lock:
        _blocked.append(text)
    raise PackageInstallError(_message(text))


def _message(command: str) -> str:
    words = _split(command)
    verb = next((i for i, w in enumerate(words) if w in _VERBS), len(words))
    packages = " ".join(w for w in words[verb + 1:] if not w.startswith("-")) or "<package>"
    return (
        f"refused to run the package installer {command!r}: lvlm_probe never installs packages, "
        "and a library it called tried to install a missing dependency. Install it yourself in "
        f"this environment, choosing the build that matches your torch and CUDA, e.g. "
        f"`{sys.executable} -m pip install {packages}`, then retry"
    )


@contextlib.contextmanager
def no_installs() -> Iterator[None]:
    """Refuse every package installation attempted inside the block.

    A refused installer never starts. The library that tried it may catch the error and go on; the
    block then raises :class:`PackageInstallError` when it ends, so the attempt is never silent.

    Raises:
        PackageInstallError: at the attempt, or when the block ends if the code inside caught it.

    Example:
        >>> with no_installs():
        ...     bridge = build_bridge(...)   # any pip/uv/conda install in here raises
    """
    global _active, _hook_added
    with _lock:
        if not _hook_added:
            sys.addaudithook(_audit)
            _hook_added = True
        if not _active:
            _blocked.clear()
        _active += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        with _lock:
            _active -= 1
            blocked = list(_blocked) if not _active else []
        if blocked and not failed:
            raise PackageInstallError(_message(blocked[0]))
