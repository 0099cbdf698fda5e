"""A registry: the one owner of a set of named choices for a config key.

The names (and a line describing each) are declared once, in `config/choices.py`, where config
validation, the CLI's help and the generated config reference read them without importing any
implementation. The module that implements the choices (named in the declaration) attaches each
with `@REGISTRY.register(name)`, and the code that uses a choice asks `REGISTRY.get(name)`,
which imports that module first if nothing has yet. A name implemented but never declared is
an error; tests check that every declared name has its implementation.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from mixtral_jax.config.errors import require_choice

T = TypeVar("T")
_DECORATE = object()  # `register(name)` with no object: return a decorator


class Registry(Generic[T]):
    """Named choices for config key `key`: `names`, `describe(name)`, `check(value)`,
    `register(name)` (a decorator, or call it with the object) and `get(name)`."""

    def __init__(self, key: str, choices: Mapping[str, str], *, module: str | None = None):
        """choices: name -> one-line description. module: the dotted module that registers the
        implementations; None = the names are plain modes that code compares against."""
        self.key = key
        self._docs = dict(choices)
        self._impls: dict[str, T] = {}
        self.module = module

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._docs)

    def __contains__(self, name: object) -> bool:
        return name in self._docs

    def __iter__(self) -> Iterator[str]:
        return iter(self._docs)

    def describe(self, name: str) -> str:
        return self._docs[name]

    def check(self, value: str, key: str | None = None) -> str:
        """`value` if it is one of the names, else a ConfigError naming the key and the closest name."""
        require_choice(value, self.names, key or self.key)
        return value

    def register(self, name: str, obj: Any = _DECORATE) -> Callable[[T], T] | T:
        """Attach the implementation of a declared name: `@R.register("x")` or `R.register("x", obj)`."""
        if name not in self._docs:
            raise KeyError(f"{self.key}: '{name}' is not declared in config/choices.py")
        if self.module is None:
            raise KeyError(f"{self.key}: its choices are plain modes, with nothing to register")

        def attach(impl: T) -> T:
            if name in self._impls:
                raise KeyError(f"{self.key}: '{name}' is registered twice")
            self._impls[name] = impl
            return impl

        return attach if obj is _DECORATE else attach(obj)

    def get(self, name: str) -> T:
        """The implementation registered for `name` (validated configs only reach known names)."""
        self.check(name)
        if self.module is None:
            raise KeyError(f"{self.key}: its choices are plain modes, with no implementation to get")
        if name not in self._impls:
            importlib.import_module(self.module)  # by name: the config layer imports no model code
        if name not in self._impls:
            raise KeyError(f"{self.key}: '{name}' is declared but its implementing module registered nothing")
        return self._impls[name]

    def implementations(self) -> dict[str, T]:
        """Every registered implementation, by name (importing the implementing module first)."""
        if self.module is not None:
            importlib.import_module(self.module)
        return dict(self._impls)
