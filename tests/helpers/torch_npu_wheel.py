"""The real torch_npu wheel, read and never imported: the contract the NPU path is tested against.

``import torch_npu`` needs Ascend's CANN libraries, which no machine of this project has, but
everything the NPU path relies on is readable from the wheel itself:

- ``torch_npu/lib/libtorch_npu.so`` holds every registered operator schema as a string, the
  form ``torch._C.parse_schema`` reads (what ``torch.ops.npu.<op>.default._schema`` shows on
  an Ascend host; ``torch_npu.<op>`` *is* ``torch.ops.npu.<op>``, see its
  ``_init/core/_exports.py``);
- ``torch_npu/op_plugin/meta/_meta_registrations.py`` holds the meta (shape and dtype)
  functions, plain Python;
- ``optim/``, ``npu/utils.py`` and ``contrib/transfer_to_npu.py`` are the Python half.

A wheel is fetched once with ``pip download --no-deps`` and the few files read from it are
kept under ``.cache/torch_npu/<version>/`` in the checkout (the schemas as text, not the
100 MB library), like the DeepSpeed JIT build: each clone downloads each version once.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from tests.helpers.launch import ROOT

CONTRACT_VERSION = "2.14.0"  # the newest torch_npu on PyPI; the emulation is derived from it
# The oldest release of each convention the RoPE patch knows: 2.1.0.post8 registers
# npu_rotary_mul with no mode argument, 2.5.1 adds rotary_mode, 2.14.0 adds rotate.
RELEASES = ("2.1.0.post8", "2.5.1", CONTRACT_VERSION)
CACHE = ROOT / ".cache" / "torch_npu"
PYTHON_FILES = (
    "op_plugin/meta/_meta_registrations.py",
    "optim/npu_fused_adamw.py",
    "optim/npu_fused_optim_base.py",
    "npu/utils.py",
    "npu/random.py",
    "npu/__init__.py",
    "_init/patches/monkey_patches.py",
    "contrib/transfer_to_npu.py",
    "_op_plugin_docs.py",
)
EXTRACTED = ("schemas.txt", "kernels.txt")  # read from libtorch_npu.so
# A registered schema as the library stores it: `npu_name[.overload](...) -> ...`, NUL-terminated.
_SCHEMA = re.compile(rb"(?<=\x00)(npu_\w+(?:\.\w+)?\([^\x00\n]*\) -> [^\x00\n]+)\x00")
# An NPU kernel as torch's codegen names its wrapper: `wrapper_NPU_[overload_]_<op>` (an aten op the
# wheel implements on the NPU, e.g. wrapper_NPU___fused_adamw_), NUL-terminated.
_KERNEL = re.compile(rb"(?<=\x00)(wrapper_NPU_\w+)\x00")


def _download(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:",
           "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
           "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
           "-d", str(into), f"torch-npu=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("torch_npu-*.whl"))
    if done.returncode or not wheels:
        pytest.fail(f"could not download torch-npu=={version} (pip exit {done.returncode}): "
                    f"{done.stderr.strip()[-600:]}")
    return wheels[0]


def fetch(version: str) -> Path:
    """The folder holding ``schemas.txt`` and the Python files of torch-npu ``version``."""
    digest = hashlib.sha1("\n".join(PYTHON_FILES + EXTRACTED).encode()).hexdigest()[:8]  # new files: a new folder
    dest = CACHE / f"{version}-{digest}"
    if all((dest / name).is_file() for name in EXTRACTED):
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp = Path(tmp)
        wheel = _download(version, tmp / "dl")
        staged = tmp / "staged"
        with zipfile.ZipFile(wheel) as zf:
            for rel in PYTHON_FILES:
                name = f"torch_npu/{rel}"
                if name in zf.namelist():
                    (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                    (staged / rel).write_bytes(zf.read(name))
            lib = zf.read("torch_npu/lib/libtorch_npu.so")
        found = sorted({m.group(1).decode() for m in _SCHEMA.finditer(lib)})
        if not found:
            pytest.fail(f"torch-npu {version}: no npu_* schema strings in libtorch_npu.so")
        (staged / "schemas.txt").write_text("\n".join(found) + "\n")
        (staged / "kernels.txt").write_text("\n".join(sorted({m.group(1).decode() for m in _KERNEL.finditer(lib)}))
                                            + "\n")
        (staged / "WHEEL").write_text(wheel.name + "\n")
        try:
            staged.rename(dest)  # atomic: a half-extracted folder is never taken for a cached one
        except OSError:  # another test process (CI runs jobs side by side) cached it first
            if not (dest / "schemas.txt").is_file():
                raise
    return dest


def npu_kernels(version: str) -> set:
    """The aten ops the wheel implements on the NPU, by their kernel wrappers' names
    (``wrapper_NPU___fused_adamw_``: ``_fused_adamw_``'s default overload)."""
    return set((fetch(version) / "kernels.txt").read_text().split())


def schemas(version: str) -> Dict[str, "torch._C.FunctionSchema"]:
    """Registered schemas by ``name`` or ``name.overload``, parsed by torch's own parser (a few
    named-dimension overloads, ``Dimname``, are beyond the parser outside a torch build and are
    left out; no op the package calls is one)."""
    import torch

    out = {}
    for line in (fetch(version) / "schemas.txt").read_text().splitlines():
        try:
            s = torch._C.parse_schema(line)
        except RuntimeError:
            if "Dimname" in line:
                continue
            raise
        out[s.name + (f".{s.overload_name}" if s.overload_name else "")] = s
    return out


def schema_text(version: str, op: str) -> str:
    for line in (fetch(version) / "schemas.txt").read_text().splitlines():
        if line.startswith(op + "("):
            return line
    raise KeyError(f"torch-npu {version} registers no {op}")


def source(version: str, rel: str) -> str:
    path = fetch(version) / rel
    if not path.is_file():
        pytest.fail(f"torch-npu {version} has no torch_npu/{rel}")
    return path.read_text()


# -- signatures --------------------------------------------------------------------------------
_REQUIRED = inspect.Parameter.empty


def signature_of_schema(schema) -> inspect.Signature:
    """The Python signature torch's binder enforces for a registered op: positional-or-keyword
    arguments up to the schema's ``*``, keyword-only after it, defaults where it gives them."""
    params = []
    for a in schema.arguments:
        kind = inspect.Parameter.KEYWORD_ONLY if a.kwarg_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        default = a.default_value if a.has_default_value() else _REQUIRED
        params.append(inspect.Parameter(a.name, kind, default=default))
    return inspect.Signature(params)


def signature_of_def(fn: ast.FunctionDef, drop_self: bool = True) -> inspect.Signature:
    """The signature of a function in the wheel's Python source, from its AST (defaults as
    literals where they are literals, else their source text)."""
    a = fn.args
    pos = a.posonlyargs + a.args
    defaults = [_REQUIRED] * (len(pos) - len(a.defaults)) + [_literal(d) for d in a.defaults]
    params = [inspect.Parameter(p.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d)
              for p, d in zip(pos, defaults)]
    if a.vararg:
        params.append(inspect.Parameter(a.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        params.append(inspect.Parameter(p.arg, inspect.Parameter.KEYWORD_ONLY,
                                        default=_REQUIRED if d is None else _literal(d)))
    if a.kwarg:
        params.append(inspect.Parameter(a.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    if drop_self and params and params[0].name == "self":
        params = params[1:]
    return inspect.Signature(params)


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ast.unparse(node)


def find_def(src: str, name: str, cls: Optional[str] = None) -> ast.FunctionDef:
    tree = ast.parse(src)
    scope = tree.body
    if cls:
        scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    for node in scope:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise KeyError(f"no def {cls + '.' if cls else ''}{name}")


# -- the real meta functions -------------------------------------------------------------------
# Device queries the meta file makes for warnings only (Ascend950 compile caution); off an
# Ascend host there is no SoC and no CANN.
_HOST_STANDINS = {"get_soc_version": lambda: 0, "get_cann_version": lambda *a, **k: ""}


def meta_functions(version: str, ops: List[str]) -> Dict[str, Callable]:
    """The wheel's own ``@impl(m, "<op>")`` meta functions for ``ops``, extracted with ``ast``
    and executed with a stand-in ``impl`` that records them (plus the top-level helpers and
    constants they name), so that they run on meta tensors without torch_npu."""
    import math
    import warnings

    import torch

    src = source(version, "op_plugin/meta/_meta_registrations.py")
    tree = ast.parse(src)
    top: Dict[str, ast.stmt] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top.setdefault(node.name, node)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    top.setdefault(t.id, node)
    wanted = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for dec in node.decorator_list:
            if (isinstance(dec, ast.Call) and getattr(dec.func, "id", None) == "impl" and len(dec.args) == 2
                    and isinstance(dec.args[1], ast.Constant) and dec.args[1].value in ops):
                wanted[dec.args[1].value] = node
    missing = set(ops) - set(wanted)
    if missing:
        raise KeyError(f"torch-npu {version} has no meta function for {sorted(missing)}")

    recorded: Dict[str, Callable] = {}

    def impl(_lib, op_name):
        def record(fn):
            recorded[op_name] = fn
            return fn
        return record

    ns = {"torch": torch, "math": math, "warnings": warnings, "impl": impl, "m": None, "m_aten": None,
          **_HOST_STANDINS}
    pending = list(wanted.values())
    body: List[ast.stmt] = []
    seen = set()
    while pending:  # pull in every top-level name the chosen functions use
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        body.append(node)
        for name in {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}:
            if name not in ns and name in top and name not in _HOST_STANDINS:
                pending.append(top[name])
    order = {id(n): i for i, n in enumerate(tree.body)}
    module = ast.Module(body=sorted(body, key=lambda n: order[id(n)]), type_ignores=[])
    exec(compile(module, f"torch_npu-{version}/_meta_registrations.py", "exec"), ns)
    return recorded


# -- call sites in the package -----------------------------------------------------------------
def torch_npu_calls(package: Path, prefix: str = "torch_npu."):
    """Every call ``torch_npu.<...>(...)`` in the package's source: (file, line, dotted name,
    positional count, keyword names, starred) found by walking each module's AST."""
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            dotted = dotted_name(node.func)
            if dotted is None or not dotted.startswith(prefix):
                continue
            starred = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
            yield (path.relative_to(package.parent), node.lineno, dotted, len(node.args),
                   [k.arg for k in node.keywords if k.arg], starred)


def dotted_name(node) -> Optional[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id] + parts[::-1])
    return None


