"""Typed YAML configs with command-line overrides (OmegaConf), validated when loaded."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


def load_config(schema: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read ``path`` into the dataclass ``schema``, apply ``key=value`` overrides, return a typed object.

    Raises:
        ValueError: naming the file and key when a key is unknown, a value has the wrong type, or an
            override is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise ValueError(f"{path}: {_describe(exc)}") from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides or [])))
    except OmegaConfBaseException as exc:
        raise ValueError(f"command-line override: {_describe(exc)}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = getattr(exc, "msg", None) or str(exc).splitlines()[0]
    return f"key '{key}': {message}" if key else message
