"""ascend_patches: stock Megatron-Core on Ascend NPUs, CUDA GPUs and plain CPUs.

``import ascend_patches`` (before or after megatron) detects the accelerator and applies
the declared patches (``ascend_patches.patches``).  ``report()`` says what was patched and
why anything was skipped; ``revert()`` puts every original back.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from typing import Iterable, Optional

import torch

from . import _state
from .backend import detect, dist_backend as _dist_backend_for
from .patches import REGISTRY
from .registry import NOT_APPLIED, Patch, PatchTargetError, State
from . import refusals
from .refusals import register as register_refusal
from .settings import (ConfigurationError, Settings, auto_apply, check_compile_ops, env_backend, env_disabled,
                       env_flag, parse_disable)
from .versions import check_megatron_version, installed_versions

__version__ = "0.1.0"
__all__ = ["apply", "revert", "configure", "disabled", "report", "settings", "dist_backend", "device",
           "compiled_decode_unavailable", "register_refusal", "keep_freed_memory",
           "gradient_accumulation_fusion_available",
           "Patch", "PatchTargetError", "REGISTRY", "ConfigurationError"]

_notes = []


def _validate_disabled(names) -> None:
    known = REGISTRY.names_and_groups()
    unknown = sorted(set(names) - known)
    if unknown:
        import difflib

        close = sorted({m for n in unknown for m in difflib.get_close_matches(n, known, n=3, cutoff=0.6)})
        groups = sorted({p.group for p in REGISTRY.patches.values()})
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigurationError(f"cannot disable unknown patch(es) {unknown}: {hint}give patch names or the groups "
                                 f"{', '.join(groups)} (python -m ascend_patches --all lists every patch)")


def _settings_from_env() -> Settings:
    disabled = env_disabled()
    _validate_disabled(disabled)
    backend, why = detect(env_backend())
    compile_ops = env_flag("ASCEND_PATCHES_COMPILE_OPS")
    check_compile_ops(backend, compile_ops)
    return Settings(backend=backend, disabled=disabled, backend_reason=why,
                    compile_decode=env_flag("ASCEND_PATCHES_COMPILE_DECODE"), compile_ops=compile_ops,
                    answer_cuda_queries=env_flag("ASCEND_PATCHES_ANSWER_CUDA_QUERIES"))


def settings() -> Settings:
    return _state.current()


def compiled_decode_unavailable(model) -> str:
    """Why the compiled decode step would not run for ``model`` ('' when it would), for a
    caller that asks for it to say so instead of silently running the eager step."""
    from .ops import decode_compiled

    if REGISTRY.state("decode_model") is not State.APPLIED:
        return "the decode_model patch is not applied (see ascend_patches.report())"
    return decode_compiled.unfit(model)


def apply() -> None:
    """Apply every patch that fits the settings; idempotent."""
    s = _state.current()
    if s.backend == "npu" and "device" not in s.disabled:
        from .device.npu import activate_transfer_to_npu

        note = activate_transfer_to_npu()
        if note not in _notes:
            _notes.append(note)
    REGISTRY.apply(s)


def revert() -> None:
    """Put every patched object back (names rebound elsewhere included)."""
    REGISTRY.revert()


def configure(backend: Optional[str] = None, disable: Optional[Iterable[str]] = None,
              compile_decode: Optional[bool] = None, compile_ops: Optional[bool] = None) -> Settings:
    """Change settings and re-apply: ``configure(disable=["ops"])`` leaves only the device
    layer; ``configure(disable=[])`` turns everything back on. Unknown names are errors.
    ``compile_decode=True``, ``compile_ops=True``: see ``settings.py``."""
    current = _state.current()
    disabled = current.disabled if disable is None else parse_disable(disable)
    _validate_disabled(disabled)
    if backend is not None:
        b, why = detect(backend)
    else:
        b, why = current.backend, current.backend_reason
    compile_ops = current.compile_ops if compile_ops is None else bool(compile_ops)
    check_compile_ops(b, compile_ops)
    was_active = REGISTRY.active
    REGISTRY.revert()
    compile_decode = current.compile_decode if compile_decode is None else bool(compile_decode)
    _state.set_current(Settings(backend=b, disabled=disabled, backend_reason=why, compile_decode=compile_decode,
                                compile_ops=compile_ops, answer_cuda_queries=current.answer_cuda_queries))
    if was_active or auto_apply():
        apply()
    return _state.current()


@contextlib.contextmanager
def disabled(*names: str):
    """``with ascend_patches.disabled("ops"):`` runs stock megatron modules (device layer
    still on) inside the block, e.g. to compare against the fused path."""
    before = _state.current().disabled
    configure(disable=set(before) | set(names))
    try:
        yield
    finally:
        configure(disable=before)


def keep_freed_memory() -> str:
    """CPU training: keep freed memory in the heap for reuse (see ``device/cpu_heap.py``); what
    was done, in words.  Not applied on import: a converter streaming shards wants its memory back."""
    from .device import cpu_heap

    return cpu_heap.keep_freed_memory()


def gradient_accumulation_fusion_available() -> bool:
    """Whether megatron accepts ``gradient_accumulation_fusion=True`` here (Apex on CUDA, or this
    package's CPU kernel applied)."""
    from .ops import grad_accum

    return grad_accum.available()


def dist_backend() -> str:
    """'hccl', 'nccl' or 'gloo' for the backend in force."""
    return _dist_backend_for(_state.backend())


def device() -> torch.device:
    from .backend import device as _device

    return _device(_state.backend())


def device_memory(which: str) -> tuple:
    """(bytes, where it came from): the backend's device's ``"free"`` or ``"total"`` memory (the
    host's available memory on the CPU backend)."""
    from .backend import device_memory as _device_memory

    return _device_memory(_state.backend(), which)


def _import_targets() -> None:
    """Import the libraries the patches target, so the report says what applies; not the
    modules of patches skipped here, nor ones waiting for a library not in use (deepspeed)."""
    s = _state.current()
    wanted = {p.module for p in REGISTRY.patches.values()
              if not REGISTRY.skip_reason(p, s) and (p.after is None or p.after in sys.modules)}
    for name in sorted(wanted):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            try:
                importlib.import_module(name)
            except ImportError:
                pass


def _states():
    return {name: REGISTRY.status.get(name, NOT_APPLIED) for name in REGISTRY.patches}


def summary(import_targets: bool = False) -> dict:
    """The report as data: backend, versions, notes, and every patch's state and reason."""
    if import_targets:
        _import_targets()
    s = _state.current()
    return {"version": __version__, "backend": s.backend, "backend_reason": s.backend_reason,
            "dist_backend": dist_backend(), "versions": installed_versions(), "notes": list(_notes),
            "disabled": sorted(s.disabled), "patches": {n: {"state": st, "why": why, "group": REGISTRY.patches[n].group,
                                                            "target": REGISTRY.patches[n].target}
                                                        for n, (st, why) in _states().items()}}


def _setting_lines(s: Settings) -> list:
    """Notes, and the settings that change what runs, for both reports."""
    from .with_deepspeed import accelerator_note

    lines = [f"note: {n}" for n in _notes]
    if accelerator_note():
        lines.append(accelerator_note())
    if s.disabled:
        lines.append(f"disabled: {', '.join(sorted(s.disabled))}")
    if s.compile_decode:
        lines.append("compile_decode: on (decode_model's TP=1 step runs through torch.compile)")
    if s.compile_ops:
        lines.append("compile_ops: on (rms_norm, swiglu, rope run torch.compile-generated CPU kernels)")
    if s.answer_cuda_queries:
        lines.append("answer_cuda_queries: on (torch.cuda.is_available()/device_count() answered for megatron.* and "
                     "tests.* callers: a test mode)")
    return lines


def short_report(import_targets: bool = False) -> str:
    """Backend, versions, how many patches are in each state, and the ones not applied with why."""
    data = summary(import_targets)
    counts = {}
    for p in data["patches"].values():
        counts[p["state"]] = counts.get(p["state"], 0) + 1
    lines = [f"ascend_patches {data['version']}: backend {data['backend']} ({data['backend_reason']}), "
             f"torch.distributed {data['dist_backend']}", f"versions: {data['versions']}",
             "patches: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))]
    lines += _setting_lines(_state.current())
    grouped = {}  # patches not applied for one same reason share a line
    for name, p in data["patches"].items():
        if p["state"] != "applied":
            grouped.setdefault((p["state"], p["why"]), []).append(name)
    for (state, why), names in grouped.items():
        lines.append(f"  {state:>8}  {', '.join(names)}: {why}")
    lines.append("(python -m ascend_patches --all: every patch with its target and why; --json: as JSON)")
    return "\n".join(lines)


def report(import_targets: bool = False) -> str:
    """A readable account: backend, versions, and each patch's state with its reason."""
    if import_targets:
        _import_targets()
    s = _state.current()
    lines = [
        f"ascend_patches {__version__}",
        f"backend: {s.backend} ({s.backend_reason}); torch.distributed backend: {dist_backend()}",
        f"versions: {installed_versions()}",
    ]
    lines += _setting_lines(s)
    counts = {}
    by_group = {}
    for name, patch in REGISTRY.patches.items():
        state, why = REGISTRY.status.get(name, NOT_APPLIED)
        counts[state] = counts.get(state, 0) + 1
        by_group.setdefault(patch.group, []).append(f"  [{state:>8}] {name:<38} {patch.kind:<7} {patch.target}\n"
                                                     f"             {why}")
    for group, rows in by_group.items():
        lines.append(f"{group}:")
        lines += rows
    lines.append("summary: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


refusals.register(ConfigurationError)
refusals.install()
_version_note = check_megatron_version()
if _version_note:
    _notes.append(_version_note)
_state.set_current(_settings_from_env())
if auto_apply():
    apply()
