"""Plugin discovery: every method, adapter and dataset comes from the `fedbench` entry-point group
(built-ins included) or from a module file named with `--plugin PATH`."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

import pluggy

from fedbench import hookspecs
from fedbench.errors import FedbenchError, unknown_name

KINDS = ("methods", "adapters", "datasets", "models")


def print_warning(line: str) -> None:
    """The default sink of run-time warnings: one line on stderr."""
    print(f"warning: {line}", file=sys.stderr)


@dataclass
class Registry:
    """Everything the installed plugins contribute, by kind and name."""

    manager: pluggy.PluginManager
    components: dict[str, dict[str, type]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: list[str] = field(default_factory=list)
    warn: Callable[[str], None] = print_warning

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> type:
        """The class registered under `name`, or one clear error listing the known names."""
        try:
            return self.components[kind][name]
        except KeyError:
            raise unknown_name(kind[:-1], name, self.names(kind)) from None

    def notify_round_end(self, **kwargs: object) -> None:
        """Call every `fedbench_round_end` observer (see `notify`)."""
        self.notify("fedbench_round_end", kwargs)

    def notify_run_end(self, **kwargs: object) -> None:
        """Call every `fedbench_run_end` observer (see `notify`)."""
        self.notify("fedbench_run_end", kwargs)

    def notify(self, hook_name: str, kwargs: dict[str, object]) -> None:
        """Call each observer on its own: one that raises is one warning naming its plugin, and
        neither the other observers nor the run's status are touched."""
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:
                self.warn(
                    f"observer plugin '{impl.plugin_name}' failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                )


def load_module_from_path(path: Path) -> ModuleType:
    """Import a plugin module from a file the user named explicitly."""
    if not path.is_file():
        raise FedbenchError(f"plugin file not found: {path}")
    module_name = f"fedbench_user_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise FedbenchError(f"plugin file is not a Python module: {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise FedbenchError(f"plugin {path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _required_base(kind: str) -> type | None:
    """The base class a contributed component must derive from (imported lazily)."""
    if kind == "methods":
        from fedbench.method import Method

        return Method
    if kind == "adapters":
        from fedbench.adapter import Adapter

        return Adapter
    if kind == "datasets":
        from fedbench.data import Dataset

        return Dataset
    from fedbench.models import Model

    return Model


def _collect(registry: Registry, kind: str) -> None:
    """Call each plugin's registration hook on its own, so one broken plugin spares the others."""
    hook = getattr(registry.manager.hook, f"fedbench_{kind}")
    base = _required_base(kind)
    for impl in hook.get_hookimpls():
        try:
            classes = impl.function() or []
        except Exception as exc:
            registry.failures.append(
                f"plugin '{impl.plugin_name}' failed in fedbench_{kind}: "
                f"{type(exc).__name__}: {exc}"
            )
            continue
        for cls in classes:
            problem = _check_component(cls, base)
            if problem:
                registry.failures.append(f"plugin '{impl.plugin_name}': {problem}")
                continue
            registry.components[kind].setdefault(cls.name, cls)


def _check_component(cls: type, base: type | None) -> str | None:
    """Why a contributed class cannot be used, or None when it can."""
    if not isinstance(getattr(cls, "name", None), str):
        return f"{getattr(cls, '__name__', cls)!r} has no string attribute 'name'"
    if base is not None and not (isinstance(cls, type) and issubclass(cls, base)):
        return f"{cls.__name__} ('{cls.name}') must subclass {base.__module__}.{base.__name__}"
    if base is not None:
        missing = [m for m in getattr(base, "required", ()) if not callable(getattr(cls, m, None))]
        if missing:
            return f"{cls.__name__} ('{cls.name}') lacks required method(s): {', '.join(missing)}"
    return None


def load_registry(plugin_paths: tuple[Path, ...] = ()) -> Registry:
    """Load installed plugins and plugin files; a broken entry point is reported, not fatal."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager)
    for ep in entry_points(group=hookspecs.PROJECT):
        try:
            module = ep.load()
        except Exception as exc:
            registry.failures.append(
                f"plugin '{ep.name}' failed to import: {type(exc).__name__}: {exc}"
            )
            continue
        if manager.get_plugin(ep.name) is None and not manager.is_registered(module):
            manager.register(module, name=ep.name)
    for path in plugin_paths:
        module = load_module_from_path(Path(path))
        manager.register(module, name=str(path))
    for kind in KINDS:
        _collect(registry, kind)
    return registry
