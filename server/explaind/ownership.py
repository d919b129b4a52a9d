"""Who may change what, with named callers ([server].callers_file).

A named caller owns what it creates: sample sets, operations, and the head versions its
edits store. Another caller may read them but not change them (append, cancel, delete),
unless it is an admin ([server].admins). Objects without an owner (made before callers
existed, or without named callers) are open to every caller, and calls without a named
caller (no auth, or one token: ``caller`` None) may change anything, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import PermissionDenied

# An ownership check of an object's owner (None: none), run where the object is read.
OwnerCheck = Callable[[str | None], None]


class Ownership:
    def __init__(self, admins: tuple[str, ...] = ()) -> None:
        self.admins = frozenset(admins)

    def may_change(self, caller: str | None, owner: str | None) -> bool:
        """Whether ``caller`` may change an object of ``owner``."""
        return caller is None or owner is None or caller == owner or caller in self.admins

    def require_owner(self, caller: str | None, owner: str | None, what: str, *, field: str) -> None:
        """PermissionDenied naming ``what`` and its owner when ``caller`` may not change it."""
        if self.may_change(caller, owner):
            return
        raise PermissionDenied(f"{what} is owned by caller {owner!r}; only it or an admin ([server].admins) may change it, "
                               f"not {caller!r}", field=field)

    def owner_check(self, caller: str | None, what: str, *, field: str) -> OwnerCheck:
        """:meth:`require_owner` for ``caller`` and ``what``, given the owner once it is read."""
        return lambda owner: self.require_owner(caller, owner, what, field=field)

    def require_head_changer(self, caller: str | None, what: str, *, field: str | None = None) -> None:
        """PermissionDenied unless ``caller`` may change the served head (``what``: the
        change; ``field``: the request's field that asked for it, where one did): with
        admins configured, only they may."""
        if caller is not None and self.admins and caller not in self.admins:
            raise PermissionDenied(f"only an admin ([server].admins) may {what}, not caller {caller!r}", field=field)
