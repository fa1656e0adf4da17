"""Plugin discovery: every method, adapter and dataset comes from the `fedbench` entry-point group
(built-ins included) or from a module file named with `--plugin PATH`."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType

import pluggy

from fedbench import hookspecs
from fedbench.errors import FedbenchError, exit_text, unknown_name

KINDS = ("methods", "adapters", "datasets", "models")
#: the distribution whose entry points are the built-ins: no other plugin takes their names
BUILTIN_DISTRIBUTION = "fedbench-med"
HOOKS = tuple(n for n in dir(hookspecs) if n.startswith("fedbench_"))


def failure_text(exc: BaseException) -> str:
    """What went wrong in a plugin's code, for one line: 'ValueError: bad' or, for a plugin that
    called sys.exit, 'it called sys.exit(3)' (never a silent exit of the whole command)."""
    if isinstance(exc, SystemExit):
        return f"it {exit_text(exc)}"
    return f"{type(exc).__name__}: {exc}"


def print_warning(line: str) -> None:
    """The default sink of run-time warnings: one line on stderr."""
    print(f"warning: {line}", file=sys.stderr)


@dataclass
class Registry:
    """Everything the installed plugins contribute, by kind and name."""

    manager: pluggy.PluginManager
    components: dict[str, dict[str, type]] = field(default_factory=lambda: {k: {} for k in KINDS})
    failures: list[str] = field(default_factory=list)
    #: by kind and name: the plugin (entry-point name or file) the component came from
    sources: dict[str, dict[str, str]] = field(default_factory=lambda: {k: {} for k in KINDS})
    warn: Callable[[str], None] = print_warning
    #: one line per observer that called sys.exit: the command that ran it exits non-zero
    exits: list[str] = field(default_factory=list)
    #: the plugins of those observers, not called again
    exited: set[str] = field(default_factory=set)
    #: whether `notify` warns of an exit at once; the CLI reports them itself, as errors, last
    warn_exits: bool = True
    #: the plugin files loaded besides the installed plugins (worker processes load them too)
    plugin_files: tuple[str, ...] = ()
    #: the plugins (entry-point names) that ship with fedbench
    builtins: set[str] = field(default_factory=set)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> type:
        """The class registered under `name` or one of its `aliases`, or one clear error
        listing the known names."""
        found = self.components[kind].get(name) or next(
            (c for c in self.components[kind].values() if name in getattr(c, "aliases", ())), None
        )
        if found is None:
            raise unknown_name(kind[:-1], name, self.names(kind))
        return found

    def notify_round_end(self, **kwargs: object) -> None:
        """Call every `fedbench_round_end` observer (see `notify`)."""
        self.notify("fedbench_round_end", kwargs)

    def notify_run_end(self, **kwargs: object) -> None:
        """Call every `fedbench_run_end` observer (see `notify`)."""
        self.notify("fedbench_run_end", kwargs)

    def notify(self, hook_name: str, kwargs: dict[str, object]) -> None:
        """Call each observer on its own: one that raises is one warning naming its plugin, and
        neither the other observers nor the run's status are touched. One that calls sys.exit
        is not called again and is listed in `exits`: the run goes on and its record is
        written, and the command then exits non-zero."""
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            if impl.plugin_name in self.exited:
                continue
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:
                self.warn(
                    f"observer plugin '{impl.plugin_name}' failed in {hook_name}: "
                    f"{type(exc).__name__}: {exc}"
                )
            except SystemExit as exc:
                line = (
                    f"observer plugin '{impl.plugin_name}' {exit_text(exc)} in {hook_name}; "
                    "it is not called again"
                )
                self.exits.append(line)
                self.exited.add(impl.plugin_name)
                if self.warn_exits:
                    self.warn(line)


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
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise FedbenchError(f"plugin {path} failed to import: {failure_text(exc)}") from exc
    return module


def _required_base(kind: str) -> type:
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
    """Call each plugin's registration hook on its own, so one broken plugin spares the others;
    a class that breaks a door rule is one warning and is not registered."""
    hook = getattr(registry.manager.hook, f"fedbench_{kind}")
    base = _required_base(kind)
    sources = registry.sources[kind]
    impls = hook.get_hookimpls()  # in registration order, the built-ins first, whatever the
    impls = sorted(impls, key=lambda i: i.plugin_name not in registry.builtins)  # install order
    for impl in impls:  # the first one keeps a name
        try:
            classes = impl.function() or []
        except (Exception, SystemExit) as exc:
            registry.failures.append(
                f"plugin '{impl.plugin_name}' failed in fedbench_{kind}: {failure_text(exc)}"
            )
            continue
        for cls in classes:
            problem = _check_component(cls, base)
            if problem is None and cls.name in registry.components[kind]:
                owner = sources[cls.name]
                whose = "the built-in plugin" if owner in registry.builtins else "plugin"
                problem = (
                    f"{kind[:-1]} name '{cls.name}' is taken by {whose} "
                    f"'{owner}'; {cls.__name__} is not registered"
                )
            if problem:
                registry.failures.append(f"plugin '{impl.plugin_name}': {problem}")
                continue
            registry.components[kind][cls.name] = cls
            sources[cls.name] = impl.plugin_name


def _check_component(cls: type, base: type) -> str | None:
    """Why a contributed class cannot be used, or None when it can."""
    label = getattr(cls, "__name__", repr(cls))
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return f"{label} must subclass {base.__module__}.{base.__name__}"
    if not isinstance(cls.__dict__.get("name"), str) or not cls.__dict__["name"]:
        return f"class {label} sets no name of its own, so it is not registered"
    missing = [m for m in base.required if getattr(cls, m, None) is getattr(base, m, None)]
    if missing:
        return f"{label} ('{cls.name}') does not implement {', '.join(missing)}"
    return _signature_problem(cls, base)


def _signature_problem(cls: type, base: type) -> str | None:
    """An overridden hook that cannot take the arguments the engine passes (e.g. a method
    written for API v2's `server_payload(self)`, which v3 calls with the client)."""
    for name, hook in vars(base).items():
        override = getattr(cls, name, None)
        if name.startswith("_") or not callable(hook) or override is getattr(base, name):
            continue
        try:
            wanted = inspect.signature(getattr(base, name))
            inspect.signature(override).bind(*wanted.parameters)
        except (TypeError, ValueError):
            return (
                f"{cls.__name__}.{name}{_shown(override)} cannot take the arguments of "
                f"{base.__name__}.{name}{_shown(getattr(base, name))}"
            )
    return None


def _shown(function: object) -> str:
    """A function's signature without annotations: '(self, client)'."""
    try:
        parameters = inspect.signature(function).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "(...)"
    return "(" + ", ".join(str(p).split(":")[0].split("=")[0] for p in parameters.values()) + ")"


def _unmarked_hooks(module: ModuleType, plugin: str) -> list[str]:
    """Functions named like a fedbench hook that lack @hookimpl (pluggy would ignore them)."""
    lines = []
    for attr in dir(module):
        value = getattr(module, attr, None)
        marked = hasattr(value, f"{hookspecs.PROJECT}_impl")
        if attr.startswith("fedbench_") and callable(value) and not marked:
            lines.append(f"plugin '{plugin}': function {attr} is not marked @hookimpl; ignored")
    return lines


def _register(registry: Registry, plugin: object, name: str) -> None:
    """Register one plugin; any error (pluggy's validation included) is one warning."""
    manager = registry.manager
    if manager.get_plugin(name) is not None or manager.is_registered(plugin):
        return
    try:
        manager.register(plugin, name=name)
    except Exception as exc:
        text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        registry.failures.append(
            f"plugin '{name}' cannot be registered: {type(exc).__name__}: {text}"
        )
        return
    if isinstance(plugin, ModuleType):
        registry.failures.extend(_unmarked_hooks(plugin, name))


def _unknown_hooks(registry: Registry) -> None:
    """Hook implementations whose name is no fedbench hook (a misspelling): one warning each
    (what pluggy's check_pending finds)."""
    for name in registry.manager.hook.__dict__:
        caller = getattr(registry.manager.hook, name)
        if getattr(caller, "spec", True) is None:
            for impl in caller.get_hookimpls():
                registry.failures.append(
                    f"plugin '{impl.plugin_name}': {name} is not a fedbench hook "
                    f"(known: {', '.join(HOOKS)}); ignored"
                )


def builtin(ep: EntryPoint) -> bool:
    """Whether the entry point ships with fedbench itself."""
    dist = getattr(ep, "dist", None)
    return dist is not None and dist.name == BUILTIN_DISTRIBUTION


def load_registry(plugin_paths: tuple[Path, ...] = ()) -> Registry:
    """Load installed plugins and plugin files; a broken plugin is reported, not fatal."""
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    registry = Registry(manager, plugin_files=tuple(str(Path(p).resolve()) for p in plugin_paths))
    for ep in sorted(entry_points(group=hookspecs.PROJECT), key=lambda e: not builtin(e)):
        try:
            module = ep.load()
        except (Exception, SystemExit) as exc:
            registry.failures.append(f"plugin '{ep.name}' failed to import: {failure_text(exc)}")
            continue
        taken = registry.manager.get_plugin(ep.name)
        if taken is not None and taken is not module:
            registry.failures.append(
                f"plugin '{ep.name}' of {getattr(ep.dist, 'name', 'an unknown package')} "
                f"is not loaded: a plugin of that name is loaded already ({taken.__name__})"
            )
            continue
        if builtin(ep):
            registry.builtins.add(ep.name)
        _register(registry, module, ep.name)
    for path in plugin_paths:
        _register(registry, load_module_from_path(Path(path)), str(path))
    _unknown_hooks(registry)
    for kind in KINDS:
        _collect(registry, kind)
    return registry
