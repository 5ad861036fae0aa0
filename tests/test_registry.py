"""The registry mechanics on throw-away modules: replace vs wrap, idempotence, revert,
rebinding of `from x import f` copies, post-import hooks, and loud failures."""

import sys
import types

import pytest

from ascend_patches.registry import Patch, PatchTargetError, Registry
from ascend_patches.settings import Settings


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


@pytest.fixture
def fake_lib():
    def f(x):
        return x + 1

    class K:
        def method(self):
            return "stock"

        def __new__(cls, *a):
            return super().__new__(cls)

    lib = _module("fake_lib_ap", f=f, K=K, FLAG=True)
    user = _module("fake_user_ap", f_alias=f, flag_copy=True)  # `from fake_lib_ap import f as f_alias`
    yield lib, user, f, K
    for n in ("fake_lib_ap", "fake_user_ap"):
        sys.modules.pop(n, None)


def _registry(*patches):
    r = Registry()
    for p in patches:
        r.declare(p)
    return r


CPU = Settings(backend="cpu")


def test_wrap_replace_sweep_idempotent_and_revert(fake_lib):
    lib, user, f, K = fake_lib
    r = _registry(
        Patch("f", "fake_lib_ap:f", wrapper=lambda orig: (lambda x: orig(x) * 10), why="t"),
        Patch("m", "fake_lib_ap:K.method", replacement=lambda self: "patched", why="t"),
        Patch("flag", "fake_lib_ap:FLAG", replacement=False, why="t"),
    )
    r.apply(CPU)
    assert lib.f(1) == 20 and user.f_alias(1) == 20, "the `from x import` copy must be rebound"
    assert K().method() == "patched"
    assert lib.FLAG is False and user.flag_copy is True, "constants must never be swept"
    first = (lib.f, K.method)
    r.apply(CPU)  # idempotent: nothing re-wrapped
    assert (lib.f, K.method) == first and lib.f(1) == 20
    r.revert()
    assert lib.f is f and user.f_alias is f and lib.FLAG is True
    assert "method" in K.__dict__ and K().method() == "stock"
    assert all(state == "reverted" for state, _ in r.status.values())


def test_dunder_new_wrap_and_revert(fake_lib):
    lib, _, _, K = fake_lib
    raw = K.__dict__["__new__"]

    def wrapper(orig):
        def __new__(cls, *a):
            obj = orig(cls, *a)
            obj.tag = "wrapped"
            return obj
        return __new__

    r = _registry(Patch("new", "fake_lib_ap:K.__new__", wrapper=wrapper, why="t"))
    r.apply(CPU)
    assert K().tag == "wrapped"
    r.revert()
    assert K.__dict__["__new__"] is raw and not hasattr(K(), "tag")


def test_post_import_hook_patches_module_imported_later(tmp_path, monkeypatch):
    (tmp_path / "late_lib_ap.py").write_text("def g():\n    return 'stock'\n")
    (tmp_path / "late_user_ap.py").write_text("from late_lib_ap import g\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = _registry(Patch("g", "late_lib_ap:g", replacement=lambda: "patched", why="t"))
    r.apply(CPU)
    assert r.status["g"][0] == "pending"
    import late_user_ap  # imports late_lib_ap, whose hook patches before the `from` binds

    assert late_user_ap.g() == "patched" and r.status["g"][0] == "applied"
    r.revert()
    import late_lib_ap

    assert late_lib_ap.g() == "stock" and late_user_ap.g() == "stock"
    for n in ("late_lib_ap", "late_user_ap"):
        sys.modules.pop(n)


def test_backend_and_disable_skip_with_reasons(fake_lib):
    lib, _, f, _ = fake_lib
    r = _registry(
        Patch("npu_only", "fake_lib_ap:f", replacement=lambda x: 0, backends=frozenset({"npu"}), why="t",
              group="other"),
        Patch("off", "fake_lib_ap:K.method", replacement=lambda self: 0, why="t", group="ops"),
    )
    r.apply(Settings(backend="cpu", disabled=frozenset({"ops"})))
    assert lib.f is f
    assert r.status["npu_only"] == ("skipped", "not for backend cpu (only npu)")
    assert r.status["off"] == ("skipped", "disabled by configuration")


def test_missing_target_is_a_loud_error_and_leaves_nothing_half_patched(fake_lib):
    lib, _, f, _ = fake_lib
    r = _registry(
        Patch("good", "fake_lib_ap:f", replacement=lambda x: 0, why="t"),
        Patch("renamed", "fake_lib_ap:K.renamed_upstream", replacement=lambda self: 0, why="t"),
    )
    with pytest.raises(PatchTargetError, match=r"fake_lib_ap:K.renamed_upstream .*megatron-core"):
        r.apply(CPU)
    assert lib.f is f, "a failed apply must roll back what it had patched"


def test_create_installs_an_absent_name_and_revert_removes_it(fake_lib):
    lib, _, _, _ = fake_lib
    r = _registry(Patch("ext", "fake_lib_ap:optional_ext", replacement="cpu kernel", create=True, why="t"),
                  Patch("ext_wrap", "fake_lib_ap:other_ext", wrapper=lambda o: o, create=True, why="t"))
    with pytest.raises(PatchTargetError, match="nothing to wrap"):
        r.apply(CPU)
    assert not hasattr(lib, "optional_ext"), "a failed apply must roll back what it had created"
    r = _registry(Patch("ext", "fake_lib_ap:optional_ext", replacement="cpu kernel", create=True, why="t"))
    r.apply(CPU)
    assert lib.optional_ext == "cpu kernel"
    r.revert()
    assert not hasattr(lib, "optional_ext"), "revert must leave the name absent, as it was"
    # an absent class attribute too (torch's FileSystemWriter.metadata_path), and its removal
    r = _registry(Patch("cls_attr", "fake_lib_ap:K.added", replacement=property(lambda self: 7), create=True, why="t"))
    r.apply(CPU)
    assert lib.K().added == 7
    r.revert()
    assert not hasattr(lib.K, "added")


def test_megatron_remove_sharded_tensors_path_on_this_torch(tmp_path):
    """megatron-core 0.16's remove_sharded_tensors renames through FileSystemWriter.metadata_path,
    which torch 2.13 no longer has; with the patch it is the checkpoint's .metadata file."""
    import ascend_patches  # noqa: F401
    import megatron.core.dist_checkpointing  # noqa: F401  (the patch waits for it)
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    assert FileSystemWriter(str(tmp_path)).metadata_path == tmp_path / ".metadata"


def test_declaration_errors():
    with pytest.raises(ValueError, match="exactly one"):
        Patch("x", "m:a", why="t")
    with pytest.raises(ValueError, match="module:attr"):
        Patch("x", "m.a", replacement=1, why="t")
    with pytest.raises(ValueError, match="unknown backends"):
        Patch("x", "m:a", replacement=1, backends=frozenset({"tpu"}), why="t")
    r = _registry(Patch("x", "m:a", replacement=1, why="t"))
    with pytest.raises(ValueError, match="declared twice"):
        r.declare(Patch("x", "m:b", replacement=1, why="t"))


def test_post_import_hook_rolls_back_like_apply(fake_lib, tmp_path, monkeypatch):
    """A target renamed upstream in a module imported after apply(): the import fails loudly
    and what was patched before (here fake_lib_ap.f) is put back, as apply() does."""
    lib, _, f, _ = fake_lib
    (tmp_path / "late_renamed_ap.py").write_text("def new_name():\n    return 'stock'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = _registry(Patch("early", "fake_lib_ap:f", replacement=lambda x: 0, why="t"),
                  Patch("late", "late_renamed_ap:old_name", replacement=lambda: "patched", why="t"))
    r.apply(CPU)
    assert lib.f is not f and r.status["late"][0] == "pending"
    with pytest.raises(PatchTargetError, match="late_renamed_ap:old_name"):
        import late_renamed_ap  # noqa: F401
    sys.modules.pop("late_renamed_ap", None)
    assert lib.f is f and not r.applied and not r.active


def test_requires_skips_a_patch_whose_dependency_is_skipped(fake_lib):
    lib, _, f, _ = fake_lib
    r = _registry(Patch("kernel", "fake_lib_ap:f", replacement=lambda x: 0, why="t"),
                  Patch("switch", "fake_lib_ap:FLAG", replacement=False, requires=("kernel",), why="t"))
    r.apply(Settings(backend="cpu", disabled=frozenset({"kernel"})))
    assert lib.FLAG is True and lib.f is f
    assert r.status["switch"] == ("skipped", "needs 'kernel', which is skipped: disabled by configuration")
    r.revert()
    r.apply(CPU)
    assert lib.FLAG is False and r.status["switch"][0] == "applied"
    r.revert()
    with pytest.raises(ValueError, match="not declared before it"):
        _registry(Patch("a", "m:a", replacement=1, requires=("b",), why="t"))


def test_wrapper_that_changes_nothing_is_reported_as_kept(fake_lib):
    """A slot filled only where the library left it empty (e.g. a TE kernel): when it is not
    empty, the patch keeps the installed object and says so."""
    lib, _, f, _ = fake_lib
    r = _registry(Patch("fill", "fake_lib_ap:f", wrapper=lambda orig: orig, why="t"))
    r.apply(CPU)
    assert lib.f is f and "fill" not in r.applied
    assert r.status["fill"] == ("skipped", "fake_lib_ap:f already provides it; kept")


def test_a_moved_target_follows_the_installed_release(monkeypatch):
    """megatron-core 0.17 renamed filesystem_async's queue getter (``_get_write_results_queue``
    -> ``get_write_results_queue(mp_mode)``): the patch is declared with both names and takes the
    one the installed release has, and it applies there."""
    import importlib.metadata as md

    import megatron.core.dist_checkpointing.strategies.filesystem_async  # noqa: F401  (the target)
    from packaging.version import Version

    import ascend_patches
    from ascend_patches import versions

    patch = ascend_patches.REGISTRY.patches["device.checkpoint_writer_queue"]
    renamed = Version(md.version("megatron-core")) >= Version("0.17")
    assert patch.target.endswith(":get_write_results_queue" if renamed else ":_get_write_results_queue")
    assert ascend_patches.REGISTRY.status[patch.name][0] == "applied"
    table = {"<0.17": "old", ">=0.17": "new"}
    for installed, want in (("0.16.1", "old"), ("0.17.0", "new"), ("0.20.0rc1", "new"), ("not installed", "new")):
        monkeypatch.setattr(versions, "version_of", lambda dist, v=installed: v)
        assert versions.for_megatron_core(table) == want, installed
    monkeypatch.setattr(versions, "version_of", lambda dist: "0.17.0")
    with pytest.raises(ValueError, match="fits 2"):
        versions.for_megatron_core({">=0.16": "a", ">=0.17": "b"})
