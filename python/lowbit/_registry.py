"""A name → entry registry filled by modules at import (used by :mod:`lowbit.methods.registry`
and :mod:`lowbit.nn.layer_formats`)."""

from __future__ import annotations

from typing import Any, Callable, Generic, Optional, TypeVar

from .errors import ValueRangeError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries with a ``name`` attribute, in registration order.

    Args:
        what: what an entry is, for error messages (``"weight method"``).
        load_builtin: imports the modules that register the built-in entries; called before
            every lookup (imports are cached, so this is cheap after the first time).
    """

    def __init__(self, what: str, load_builtin: Callable[[], None]):
        self.what = what
        self._load = load_builtin
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add ``entry`` under ``entry.name``; a second, different entry of that name is an error."""
        name: Any = getattr(entry, "name")
        if name in self._entries and self._entries[name] is not entry:
            raise ValueRangeError(f"name: a {self.what} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: Any) -> Optional[T]:
        """The entry ``name``, or ``None``."""
        self._load()
        return self._entries.get(name) if isinstance(name, str) else None

    def all(self) -> dict[str, T]:
        """Every entry, by name."""
        self._load()
        return dict(self._entries)
