"""One registry type for every named choice (backbones, exits, losses, policies, devices, data sets...).

Torch-free, so the runtime and the training side share it. Like torchvision's model registry it
refuses a duplicate name; unlike timm's it never overwrites silently. `get` raises the
project's typed error with the valid names, so every "unknown X" message reads the same.
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from edgeexit.errors import ConfigError, EdgeExitError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind; an entry may take an argument written as `NAME:ARG` (e.g. `folder:PATH`)."""

    def __init__(self, kind: str, error: type[EdgeExitError] = ConfigError) -> None:
        self.kind = kind
        self.error = error
        self._entries: dict[str, T] = {}
        self._arg_names: dict[str, str] = {}

    def register(self, name: str, value: T | None = None, *, arg: str | None = None) -> Callable[[T], T] | T:
        """Add `value` under `name` (or decorate it); `arg` names the argument of a `NAME:ARG` entry."""
        if value is None:
            return lambda fn: self.register(name, fn, arg=arg)  # type: ignore[return-value]
        if name in self._entries:
            raise ValueError(f"a {self.kind} named '{name}' is already registered")
        self._entries[name] = value
        if arg is not None:
            self._arg_names[name] = arg
        return value

    def names(self) -> list[str]:
        """Registered names in registration order, argument entries as `NAME:ARG`."""
        return [f"{n}:{self._arg_names[n]}" if n in self._arg_names else n for n in self._entries]

    def choices(self) -> str:
        """The names as one comma-separated string, for help texts and errors."""
        return ", ".join(self.names())

    def get(self, name: str) -> T:
        """The entry registered as `name`; the registry's error type naming the valid choices otherwise."""
        if name not in self._entries or name in self._arg_names:
            raise self.error(f"unknown {self.kind} '{name}'; choose from: {self.choices()}")
        return self._entries[name]

    def resolve(self, spec: str) -> tuple[T, str | None]:
        """Split `NAME` or `NAME:ARG` into (entry, ARG or None); an argument entry needs its ARG."""
        prefix, sep, arg = spec.partition(":")
        if sep and prefix in self._arg_names:
            if not arg:
                raise self.error(f"{self.kind} '{spec}' needs a {self._arg_names[prefix]} after '{prefix}:'")
            return self._entries[prefix], arg
        return self.get(spec), None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, entry) pairs in registration order."""
        return iter(self._entries.items())
