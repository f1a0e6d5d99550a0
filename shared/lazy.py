"""``lazy``: an attribute computed on its first read and kept in the instance's ``__dict__``.

``functools.cached_property`` does the same, but on Python 3.11 it takes a lock on every first
read (removed in 3.12): the patient fold reads a dozen such attributes of objects it has just
built, one patient at a time, and the lock was a measurable part of it. The fold's objects are
never shared between threads while they are being built, so the lock guarded nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")


class lazy(Generic[T]):  # noqa: N801 - used as a decorator, like the property it stands for
    def __init__(self, compute: Callable[[Any], T]) -> None:
        self.compute, self.name = compute, compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> lazy[T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> T | lazy[T]:
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.compute(instance)
        return value
