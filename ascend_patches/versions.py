"""Versions of the libraries we patch, and the megatron-core range this release is tested on."""

from __future__ import annotations

import importlib.metadata as md
import sys
import warnings
from typing import Dict

from packaging.specifiers import SpecifierSet
from packaging.version import Version

# .ci/run tests the oldest release and the newest of each other minor (its import-order, parity
# and registry tests) beside the installed 0.16.1 (the whole suite); 0.11 lacks the local layer
# spec's RMSNorm that LLaMA-2 needs.  0.17+ declare Python >= 3.12 but ship cp311 wheels whose
# sources compile on 3.11: .ci/run installs them with --ignore-requires-python.
TESTED_MEGATRON_CORE = (">=0.12.0", "<0.20.0")
OLDER_RELEASES_TESTED = ("0.12.0", "0.12.3", "0.13.1", "0.14.0", "0.15.3")
NEWER_RELEASES_TESTED = ("0.17.1", "0.18.2", "0.19.2")


def version_of(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def installed_versions() -> str:
    names = ("torch", "megatron-core", "torch_npu", "deepspeed")
    found = {n: version_of(n) for n in names}
    npu = sys.modules.get("torch_npu")
    if npu is not None and getattr(npu, "__version__", None):
        found["torch_npu"] = npu.__version__  # imported: trust the module (also the test emulation)
    return ", ".join(f"{n} {v}" for n, v in found.items())


def for_megatron_core(choices: Dict[str, str]) -> str:
    """The value that fits the installed megatron-core, from ``{specifier: value}``: a patch
    target that moved between releases is declared with each release's name.  With no
    megatron-core installed, the newest release's."""
    installed = version_of("megatron-core")
    if installed == "not installed":
        return list(choices.values())[-1]
    fits = [v for spec, v in choices.items() if SpecifierSet(spec, prereleases=True).contains(installed, prereleases=True)]
    if len(fits) != 1:
        raise ValueError(f"megatron-core {installed} fits {len(fits)} of {list(choices)}: the table must cover each "
                         "release once")
    return fits[0]


def megatron_core_matches(specifier: str) -> bool:
    """Whether the installed megatron-core is in ``specifier`` (none installed: yes)."""
    installed = version_of("megatron-core")
    return installed == "not installed" or SpecifierSet(specifier, prereleases=True).contains(installed,
                                                                                             prereleases=True)


def lacking_fields(config_class, names) -> str:
    """The names of ``names`` that the installed release's config dataclass (megatron-core's
    ``TransformerConfig``, ``OptimizerConfig``) has no field for, comma-separated ("" when it has
    them all), for a flag's one-line refusal that names the release."""
    import dataclasses

    return ", ".join(sorted(set(names) - {f.name for f in dataclasses.fields(config_class)}))


def megatron_in_tested_range(version: str) -> bool:
    if version == "not installed":
        return True
    return Version(version) in SpecifierSet(",".join(TESTED_MEGATRON_CORE))


def check_megatron_version() -> str:
    """Warn (once per process) if megatron-core is outside the tested range; return a note."""
    v = version_of("megatron-core")
    if megatron_in_tested_range(v):
        return ""
    note = (
        f"megatron-core {v} is outside the range ascend_patches is tested on "
        f"({','.join(TESTED_MEGATRON_CORE)}); patches whose targets moved will fail loudly"
    )
    warnings.warn(note, stacklevel=3)
    return note
