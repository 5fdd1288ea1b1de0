"""The listener plan of a reload: which listeners stay, which close and which open, and when.

Pure: it reads names and addresses and decides; the reload (``proxy.lifecycle.reload``)
does the binding and closing.  The rules, by listener name:

* **keep**: bound now, and configured again at the very same address: it stays bound
  and only its router and limits are swapped;
* **close**: bound now, and either gone from the config or moved to another address:
  it stops accepting and closes once its in-flight requests have ended;
* **open first**: configured but not bound now (new, moved, or left unbound by an earlier
  reload): bound *before* anything closes, so that one which cannot bind rejects the
  reload while nothing has changed yet;
* **open after**: like the above, but its address is the same socket as one a closing
  listener holds (two listeners swap ports, a listener is renamed, ``localhost:8080``
  becomes ``127.0.0.1:8080``): it can only be bound once that one has stopped accepting,
  so a failure then leaves it unbound (``/readyz`` 503) instead of rejecting the reload.

Addresses are compared as written: any change of the text moves the listener.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from proxy.config import ListenerConfig, same_socket

__all__ = ["ListenerPlan", "Opening", "plan_listeners"]


@dataclass(frozen=True, slots=True)
class Opening:
    """A listener to bind: ``index`` is its place in the config's ``listeners`` (error paths name it)."""

    index: int
    name: str
    address: str


@dataclass(frozen=True, slots=True)
class ListenerPlan:
    """What a reload does to the listeners; every tuple is in config order (``close``: in bound order)."""

    keep: tuple[str, ...]
    close: tuple[str, ...]
    open_first: tuple[Opening, ...]
    open_after: tuple[Opening, ...]


def plan_listeners(bound: Mapping[str, str], wanted: Iterable[ListenerConfig]) -> ListenerPlan:
    """The plan that takes the listeners ``bound`` now (name -> address) to the ``wanted`` ones."""
    wanted_at = {lst.name: (index, lst.address) for index, lst in enumerate(wanted)}
    close = tuple(name for name, address in bound.items()
                  if name not in wanted_at or wanted_at[name][1] != address)
    freed = [bound[name] for name in close]
    keep: list[str] = []
    open_first: list[Opening] = []
    open_after: list[Opening] = []
    for name, (index, address) in wanted_at.items():
        if name in bound and name not in close:
            keep.append(name)
        elif any(same_socket(address, held) for held in freed):
            open_after.append(Opening(index, name, address))
        else:
            open_first.append(Opening(index, name, address))
    return ListenerPlan(tuple(keep), close, tuple(open_first), tuple(open_after))
