"""The reload's listener plan: keep, close, open first and open after, one rule at a time."""

from __future__ import annotations

from proxy.config import ListenerConfig
from proxy.lifecycle.plan import ListenerPlan, Opening, plan_listeners


def _wanted(*listeners: tuple[str, str]) -> list[ListenerConfig]:
    return [ListenerConfig(name=name, address=address, routes=()) for name, address in listeners]


def test_a_listener_configured_again_at_the_same_address_is_kept_and_nothing_else_happens() -> None:
    plan = plan_listeners({"main": "127.0.0.1:8080"}, _wanted(("main", "127.0.0.1:8080")))
    assert plan == ListenerPlan(keep=("main",), close=(), open_first=(), open_after=())


def test_a_new_listener_is_opened_before_anything_closes_and_the_others_are_kept() -> None:
    plan = plan_listeners({"main": "127.0.0.1:8080"},
                          _wanted(("main", "127.0.0.1:8080"), ("admin-api", "127.0.0.1:8081")))
    assert plan.keep == ("main",)
    assert plan.close == ()
    assert plan.open_first == (Opening(1, "admin-api", "127.0.0.1:8081"),)
    assert plan.open_after == ()


def test_a_listener_gone_from_the_config_is_closed() -> None:
    plan = plan_listeners({"main": "127.0.0.1:8080", "old": "127.0.0.1:8081"}, _wanted(("main", "127.0.0.1:8080")))
    assert plan == ListenerPlan(keep=("main",), close=("old",), open_first=(), open_after=())


def test_a_listener_moved_to_a_free_address_closes_the_old_socket_and_opens_the_new_one_first() -> None:
    plan = plan_listeners({"main": "127.0.0.1:8080"}, _wanted(("main", "127.0.0.1:9090")))
    assert plan == ListenerPlan(keep=(), close=("main",), open_first=(Opening(0, "main", "127.0.0.1:9090"),),
                                open_after=())


def test_two_listeners_swapping_ports_are_each_opened_after_the_other_has_closed() -> None:
    plan = plan_listeners({"a": "127.0.0.1:8080", "b": "127.0.0.1:8081"},
                          _wanted(("a", "127.0.0.1:8081"), ("b", "127.0.0.1:8080")))
    assert plan.keep == ()
    assert plan.close == ("a", "b")
    assert plan.open_first == ()
    assert plan.open_after == (Opening(0, "a", "127.0.0.1:8081"), Opening(1, "b", "127.0.0.1:8080"))


def test_a_renamed_listener_at_the_same_address_waits_for_the_old_name_to_close() -> None:
    plan = plan_listeners({"old": "127.0.0.1:8080"}, _wanted(("new", "127.0.0.1:8080")))
    assert plan == ListenerPlan(keep=(), close=("old",), open_first=(),
                                open_after=(Opening(0, "new", "127.0.0.1:8080"),))


def test_an_address_written_differently_moves_the_listener_onto_its_own_freed_socket() -> None:
    """Addresses compare as text; ``localhost`` and ``127.0.0.1`` on one port are the same socket."""
    plan = plan_listeners({"main": "localhost:8080"}, _wanted(("main", "127.0.0.1:8080")))
    assert plan == ListenerPlan(keep=(), close=("main",), open_first=(),
                                open_after=(Opening(0, "main", "127.0.0.1:8080"),))


def test_a_wildcard_address_clashes_with_a_freed_specific_one_on_the_same_port() -> None:
    plan = plan_listeners({"main": "127.0.0.1:8080"}, _wanted(("main", "0.0.0.0:8080")))
    assert plan.open_after == (Opening(0, "main", "0.0.0.0:8080"),)
    assert plan.open_first == ()


def test_port_zero_never_waits_for_a_freed_socket() -> None:
    """Port 0 picks a free port, so it cannot clash with the one a closing listener held."""
    plan = plan_listeners({"old": "127.0.0.1:0"}, _wanted(("new", "127.0.0.1:0")))
    assert plan == ListenerPlan(keep=(), close=("old",), open_first=(Opening(0, "new", "127.0.0.1:0"),),
                                open_after=())


def test_a_configured_listener_left_unbound_by_an_earlier_reload_is_opened_again() -> None:
    """Not bound but in the config (its bind failed): opened like a new one, nothing to close."""
    plan = plan_listeners({"main": "127.0.0.1:8080"},
                          _wanted(("main", "127.0.0.1:8080"), ("side", "127.0.0.1:8081")))
    assert plan.open_first == (Opening(1, "side", "127.0.0.1:8081"),)
    assert plan.close == ()


def test_a_kept_listener_does_not_free_its_address_for_a_new_one() -> None:
    """Only closing listeners free a socket: a new listener on a kept one's port is opened first (and fails)."""
    plan = plan_listeners({"main": "127.0.0.1:8080"},
                          _wanted(("main", "127.0.0.1:8080"), ("twin", "127.0.0.1:8080")))
    assert plan.keep == ("main",)
    assert plan.open_first == (Opening(1, "twin", "127.0.0.1:8080"),)
    assert plan.open_after == ()


def test_a_mixed_reload_sorts_every_listener_by_its_rule_in_config_order() -> None:
    bound = {"keep": "127.0.0.1:8001", "gone": "127.0.0.1:8002", "moved": "127.0.0.1:8003"}
    plan = plan_listeners(bound, _wanted(("fresh", "127.0.0.1:8004"), ("moved", "127.0.0.1:8005"),
                                         ("keep", "127.0.0.1:8001"), ("taker", "127.0.0.1:8002")))
    assert plan == ListenerPlan(
        keep=("keep",),
        close=("gone", "moved"),
        open_first=(Opening(0, "fresh", "127.0.0.1:8004"), Opening(1, "moved", "127.0.0.1:8005")),
        open_after=(Opening(3, "taker", "127.0.0.1:8002"),),
    )


def test_an_empty_config_closes_every_bound_listener() -> None:
    plan = plan_listeners({"a": "127.0.0.1:8001", "b": "[::1]:8002"}, [])
    assert plan == ListenerPlan(keep=(), close=("a", "b"), open_first=(), open_after=())
