"""Which source files a plugin's code is: the module that defines the class and every module of
the same top-level package it imports, directly or through another (read from the import
statements, not by running them). Their hash goes into the config hash and the federation
cache key, so an edit to a plugin's helper module is never mistaken for finished work."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from pathlib import Path


def module_path(name: str) -> Path | None:
    """The source file of module `name`, or None (a built-in, a namespace, or not found)."""
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    if path is None:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None
        path = spec.origin if spec is not None else None
    return Path(path) if path and path.endswith(".py") else None


def imported_names(path: Path, name: str) -> set[str]:
    """The modules `path` (module `name`) names in its import statements, relative ones
    resolved; `from p import m` names both p and p.m (m may be a module)."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                origin = f"{base}.{node.module}" if node.module else base
            else:
                origin = node.module or ""
            names.add(origin)
            names.update(f"{origin}.{alias.name}" for alias in node.names)
    return {n for n in names if n}


def package_sources(module: str) -> dict[str, Path]:
    """`module`'s file and those of the modules of its top-level package it imports,
    transitively, by module name."""
    top = module.split(".")[0]
    found: dict[str, Path] = {}
    pending = [module]
    while pending:
        name = pending.pop()
        if name in found or name.split(".")[0] != top:
            continue
        path = module_path(name)
        if path is None:
            continue
        found[name] = path
        pending.extend(imported_names(path, name))
    return found


def source_hash(cls: type) -> str:
    """A short hash of the source files of `cls`'s code ("unknown" when it has none)."""
    files = package_sources(cls.__module__)
    if not files:
        return "unknown"
    digest = hashlib.sha256()
    try:
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + files[name].read_bytes() + b"\0")
    except OSError:
        return "unknown"
    return digest.hexdigest()[:12]
