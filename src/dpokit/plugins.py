"""Code a user names in a setting: ``module:function`` or ``path/to/file.py:function``.

A judge (``--judge``) and a loss (``loss_type``) are both given this way, so both read the spec with this one
resolver and fail with the same one-line errors, naming the setting (``what``) and the spec.

* ``module:function`` imports ``module`` as Python does, and also from the current directory: the ``dpokit``
  console script starts with its own directory on ``sys.path``, not the one it is run from, so a ``judge.py`` beside
  the user would otherwise not be found (``python -m dpokit`` finds it either way).
* ``path/to/file.py:function`` (any spec whose module part ends in ``.py`` or holds a ``/``) loads that file, once
  per process, with its directory on ``sys.path`` (as ``python path/to/file.py`` has it), so that it can import the
  files beside it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from dpokit.errors import ConfigError


def split(spec: str) -> Optional[tuple[str, str]]:
    """``(module or file, function)`` of a spec such as ``mymod:fn`` or ``./losses.py:fn``; None when the text has
    no such shape (a plain name, a path without a function)."""
    if not isinstance(spec, str):
        return None
    module, sep, name = spec.strip().rpartition(":")
    if not sep or not module or not name.isidentifier():
        return None
    return module, name


def _names_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def absolute(spec: str) -> str:
    """The spec with its file made absolute, so that a run's recorded config loads the same file from any
    directory; a ``module:function`` spec (or text that is no spec) is returned as it is."""
    parts = split(spec)
    if parts is None or not _names_file(parts[0]) or not Path(parts[0]).expanduser().is_file():
        return spec
    return f"{Path(parts[0]).expanduser().resolve()}:{parts[1]}"


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable a spec names; ConfigError ``"<what> '<spec>': ..."`` when it cannot be had."""
    parts = split(spec)
    if parts is None:
        raise ConfigError(f"{what} {spec!r}: expected module:function or path/to/file.py:function")
    module_name, name = parts
    module = _load_file(module_name, spec, what) if _names_file(module_name) else _import(module_name, spec, what)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"{what} {spec!r}: module {module_name!r} has no function {name!r}")
    return fn


def _import(module_name: str, spec: str, what: str):
    try:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            cwd = os.getcwd()
            top = module_name.split(".")[0]
            on_path = {os.path.abspath(p or ".") for p in sys.path}
            if exc.name != top or cwd in on_path:
                raise
            # Appended, not put first: a module of the user's cannot shadow an installed package of the same name.
            sys.path.append(cwd)
            importlib.invalidate_caches()
            return importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # the user's module failed while it ran: named in one line (--debug: the traceback)
        raise ConfigError(f"{what} {spec!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc


def _load_file(text: str, spec: str, what: str):
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"{what} {spec!r}: no such file {path}")
    path = path.resolve()
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
        importlib.invalidate_caches()
    # Where `import <stem>` loads this very file, the file is that module: `import my_loss` in the user's script and
    # `my_loss.py:fn` in the config are then one module, and the losses it registers are registered once.
    try:
        found = importlib.util.find_spec(path.stem) if path.stem.isidentifier() else None
    except (ImportError, ValueError):
        found = None
    if found is not None and found.origin and Path(found.origin).resolve() == path:
        return _import(path.stem, spec, what)
    # Otherwise (an installed package of that name comes first) a private module name, one per file: loading the
    # file again returns the same module, and the file cannot shadow the package.
    name = f"_dpokit_file_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"{what} {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file failed while it ran: named in one line (--debug: the traceback)
        del sys.modules[name]
        raise ConfigError(f"{what} {spec!r}: running {path} raised {type(exc).__name__}: {exc}") from exc
    return module
