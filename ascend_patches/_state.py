"""The settings in force, shared by the ops (which pick their NPU/CUDA/CPU implementation)."""

from .settings import Settings

_current = Settings(backend="cpu")


def current() -> Settings:
    return _current


def backend() -> str:
    return _current.backend


def set_current(settings: Settings) -> None:
    global _current
    _current = settings
