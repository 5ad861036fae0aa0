"""The patch registry: declared patches, applied idempotently, reversibly, in any import order.

Each patch names its target as ``"module:attr.path"``; the colon says exactly which part is
the module to import, so a target is resolved without guessing and a post-import hook can
be registered for a module not yet imported.  A patch either *replaces* the target with an
object, or *wraps* it: ``wrapper(original) -> new``.  Nothing is inferred from names.

Names that other modules bound with ``from x import f`` keep the original object; when a
module-level target is patched, every loaded module attribute that *is* the original object
is rebound too (``sweep``), and put back on revert.
"""

from __future__ import annotations

import enum
import sys
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, NamedTuple, Optional, Tuple

import wrapt

_MISSING = object()
ALL_BACKENDS = frozenset({"npu", "cuda", "cpu"})


class State(str, enum.Enum):
    """Where a declared patch stands; compares and prints as its value."""

    APPLIED = "applied"
    PENDING = "pending"  # its module (or the library it waits for) is not imported yet
    SKIPPED = "skipped"
    NOT_APPLIED = "not applied"  # ascend_patches.apply() has not run

    def __str__(self) -> str:
        return self.value


class PatchStatus(NamedTuple):
    state: State
    reason: str


NOT_APPLIED = PatchStatus(State.NOT_APPLIED, "ascend_patches.apply() not called")


class PatchTargetError(RuntimeError):
    """A declared target does not exist in the installed library (renamed or removed upstream)."""


class PatchNotApplicable(Exception):
    """Raised by a wrapper that finds, at patch time, that what it would call is unusable here
    (e.g. an installed kernel whose schema fits no calling convention it knows): the patch is
    skipped, the target kept, and the message is the report's reason."""


@dataclass(frozen=True)
class Patch:
    name: str
    target: str  # "module:attr.path"
    why: str
    replacement: Any = None  # the object to install (kind == "replace")
    wrapper: Optional[Callable[[Any], Any]] = None  # original -> new (kind == "wrap")
    backends: FrozenSet[str] = ALL_BACKENDS
    group: str = "ops"
    sweep: bool = True  # rebind `from x import f` copies of a module-level target
    requires: Tuple[str, ...] = ()  # patches this one only makes sense with; skipped when any of them is
    option: Optional[str] = None  # a Settings flag that must be on (an opt-in mode)
    after: Optional[str] = None  # a module that must be imported too (e.g. "deepspeed"): pending until it is
    create: bool = False  # the target may be absent (an optional extension that failed to import)
    megatron_core: Optional[str] = None  # a version specifier: skipped for an installed release outside it

    def __post_init__(self):
        if (self.replacement is None) == (self.wrapper is None):
            raise ValueError(f"patch {self.name}: give exactly one of replacement= or wrapper=")
        if ":" not in self.target:
            raise ValueError(f"patch {self.name}: target must be 'module:attr', got {self.target!r}")
        if not self.backends <= ALL_BACKENDS:
            raise ValueError(f"patch {self.name}: unknown backends {set(self.backends) - ALL_BACKENDS}")
        if isinstance(self.requires, str):
            raise ValueError(f"patch {self.name}: requires= takes a tuple of patch names, got {self.requires!r}")

    @property
    def kind(self) -> str:
        return "replace" if self.replacement is not None else "wrap"

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def attr_path(self) -> List[str]:
        return self.target.split(":", 1)[1].split(".")


@dataclass
class _Applied:
    owner: Any
    attr: str
    saved: Any  # raw entry from owner.__dict__ (or _MISSING), restored on revert
    original: Any
    new: Any
    swept: bool = False  # copies elsewhere were rebound; revert sweeps them back


class Registry:
    def __init__(self):
        self.patches: Dict[str, Patch] = {}
        self.applied: Dict[str, _Applied] = {}
        self.status: Dict[str, PatchStatus] = {}
        self.active = False
        self._settings = None
        self._hooked_modules: set = set()
        self._lock = threading.RLock()

    # -- declaration -------------------------------------------------------------------
    def declare(self, patch: Patch) -> Patch:
        if patch.name in self.patches:
            raise ValueError(f"patch {patch.name!r} declared twice")
        unknown = [r for r in patch.requires if r not in self.patches]
        if unknown:
            raise ValueError(f"patch {patch.name!r} requires {unknown}, which are not declared before it")
        self.patches[patch.name] = patch
        return patch

    def names_and_groups(self) -> set:
        return set(self.patches) | {p.group for p in self.patches.values()}

    # -- applying ----------------------------------------------------------------------
    def apply(self, settings) -> None:
        with self._lock:
            self._settings = settings
            self.active = True
            for patch in self.patches.values():
                if patch.name in self.applied:
                    continue  # idempotent
                skip = self._skip_reason(patch, settings)
                if skip:
                    self.status[patch.name] = PatchStatus(State.SKIPPED, skip)
                    continue
                waiting = [m for m in (patch.module, patch.after) if m and m not in sys.modules]
                if not waiting:
                    try:
                        self._apply_one(patch)
                    except PatchTargetError:
                        self.revert()  # never leave a half-patched state behind
                        raise
                else:
                    self.status[patch.name] = PatchStatus(
                        State.PENDING, f"applies when {' and '.join(waiting)} "
                                       f"{'is' if len(waiting) == 1 else 'are'} imported")
                    for m in waiting:
                        self._hook(m)

    def state(self, name: str) -> State:
        return self.status.get(name, NOT_APPLIED).state

    def skip_reason(self, patch: Patch, settings) -> Optional[str]:
        """Why ``patch`` does not apply under ``settings`` (None: it does)."""
        return self._skip_reason(patch, settings)

    def _skip_reason(self, patch: Patch, settings) -> Optional[str]:
        if patch.name in settings.disabled or patch.group in settings.disabled:
            return "disabled by configuration"
        if settings.backend not in patch.backends:
            return f"not for backend {settings.backend} (only {'/'.join(sorted(patch.backends))})"
        if patch.option and not getattr(settings, patch.option):
            return f"opt-in, off (settings.{patch.option})"
        if patch.megatron_core:
            from .versions import megatron_core_matches

            if not megatron_core_matches(patch.megatron_core):
                return f"for megatron-core {patch.megatron_core} only"
        for name in patch.requires:
            why = self._skip_reason(self.patches[name], settings)
            if why:
                return f"needs {name!r}, which is skipped: {why}"
        return None

    def _hook(self, module_name: str) -> None:
        if module_name in self._hooked_modules:
            return
        self._hooked_modules.add(module_name)
        wrapt.register_post_import_hook(self._on_import, module_name)

    def _on_import(self, module) -> None:
        with self._lock:
            if not self.active:
                return
            for patch in self.patches.values():
                if self.state(patch.name) is not State.PENDING or module.__name__ not in (patch.module,
                                                                                          patch.after):
                    continue
                if all(m in sys.modules or m == module.__name__ for m in (patch.module, patch.after) if m):
                    try:
                        self._apply_one(patch)
                    except PatchTargetError:
                        self.revert()  # as apply() does: all or nothing, never half-patched
                        raise

    def _apply_one(self, patch: Patch) -> None:
        owner, attr = _resolve_owner(patch)
        raw = owner.__dict__.get(attr, _MISSING) if hasattr(owner, "__dict__") else _MISSING
        try:
            original = getattr(owner, attr)
        except AttributeError:
            if not patch.create:
                raise PatchTargetError(_missing_message(patch)) from None
            original = _MISSING
        if isinstance(owner, type) and original is not _MISSING and not _defined_in_package(owner, attr):
            # e.g. a method renamed upstream: getattr finds torch.nn.Module's instead.
            raise PatchTargetError(_missing_message(patch))
        if original is _MISSING and patch.kind == "wrap":
            raise PatchTargetError(f"patch {patch.name}: {patch.target} is absent, so there is nothing to wrap")
        try:
            new = patch.replacement if patch.kind == "replace" else patch.wrapper(original)
        except PatchNotApplicable as why:
            self.status[patch.name] = PatchStatus(State.SKIPPED, str(why))
            return
        if new is original:  # the wrapper found nothing to change (e.g. a kernel the library already has)
            self.status[patch.name] = PatchStatus(State.SKIPPED, f"{patch.target} already provides it; kept")
            return
        if isinstance(raw, staticmethod) and attr != "__new__":
            new = staticmethod(new)
        setattr(owner, attr, new)
        record = _Applied(owner, attr, raw, original, new)
        if patch.sweep and original is not _MISSING and isinstance(owner, type(sys)) and _sweepable(original):
            _rebind_everywhere(original, new, skip=owner)
            record.swept = True
        self.applied[patch.name] = record
        self.status[patch.name] = PatchStatus(State.APPLIED, patch.why)

    # -- reverting ---------------------------------------------------------------------
    def revert(self) -> None:
        with self._lock:
            for name in reversed(list(self.applied)):
                rec = self.applied.pop(name)
                if rec.original is _MISSING:  # created by the patch: remove it again
                    delattr(rec.owner, rec.attr)
                elif rec.saved is _MISSING:
                    try:
                        delattr(rec.owner, rec.attr)
                    except AttributeError:
                        pass
                    if not hasattr(rec.owner, rec.attr) or getattr(rec.owner, rec.attr) is not rec.original:
                        setattr(rec.owner, rec.attr, rec.original)
                else:
                    setattr(rec.owner, rec.attr, rec.saved)
                if rec.swept:
                    # Modules imported after the patch bound the new object themselves:
                    # find every copy, not only the ones recorded when applying.
                    _rebind_everywhere(rec.new, rec.original, skip=None)
            self.status = {n: ("reverted", "ascend_patches.revert() was called") for n in self.patches}
            self.active = False

    def original(self, name: str):
        """The object a patch replaced (for fallbacks and tests)."""
        return self.applied[name].original


def _resolve_owner(patch: Patch):
    module = sys.modules.get(patch.module)
    if module is None:
        module = __import__(patch.module, fromlist=["_"])
    owner = module
    path = patch.attr_path
    for part in path[:-1]:
        try:
            owner = getattr(owner, part)
        except AttributeError:
            raise PatchTargetError(_missing_message(patch)) from None
    return owner, path[-1]


def _defined_in_package(cls: type, attr: str) -> bool:
    definer = next((k for k in cls.__mro__ if attr in k.__dict__), None)
    return definer is not None and definer.__module__.split(".")[0] == cls.__module__.split(".")[0]


def _missing_message(patch: Patch) -> str:
    from .versions import installed_versions

    return (
        f"patch {patch.name!r}: target {patch.target} does not exist in the installed "
        f"libraries ({installed_versions()}); it was probably renamed upstream. "
        f"Disable it with ASCEND_PATCHES_DISABLE={patch.name} or use a tested megatron-core."
    )


def _sweepable(obj) -> bool:
    # Only functions and classes are bound by name elsewhere; a constant such as True or 0
    # "is" countless unrelated attributes and must never be swept.
    return isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type))


def _rebind_everywhere(original, new, skip) -> None:
    for mod in list(sys.modules.values()):
        if mod is None or mod is skip:
            continue
        try:
            items = list(vars(mod).items())
        except TypeError:
            continue
        for key, value in items:
            if value is original:
                try:
                    setattr(mod, key, new)
                except (AttributeError, TypeError):
                    continue


def warn_once(message: str, _seen=set()) -> None:
    if message not in _seen:
        _seen.add(message)
        warnings.warn(message, stacklevel=3)
