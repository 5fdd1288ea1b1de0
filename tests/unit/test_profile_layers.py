"""The profile summary (tests/bench/profile_layers.py) counts each sample under its innermost layer."""

from __future__ import annotations

from tests.bench.profile_layers import LOOP, OTHER, layer, shares

LOOP_FRAMES = "main (proxy/__main__.py:1);Runner.run (asyncio/runners.py:118)"


def test_the_innermost_outrigger_layer_wins_over_the_outer_ones() -> None:
    stack = f"{LOOP_FRAMES};serve (proxy/edge/exchange.py:90);Retry.__call__ (proxy/policies/retry.py:9)"
    assert layer(stack.split(";")).startswith("policy chain")
    stack += ";UpstreamCall.__call__ (proxy/upstream/call.py:170)"
    assert layer(stack.split(";")).startswith("upstream client")


def test_loop_only_and_unknown_stacks_have_their_own_rows() -> None:
    assert layer(LOOP_FRAMES.split(";")) == LOOP
    assert layer(["Thread.run (threading.py:975)", "Condition.wait (threading.py:320)"]) == OTHER


def test_shares_add_the_sample_counts_and_skip_broken_lines() -> None:
    counts, total = shares([f"{LOOP_FRAMES};serve (proxy/edge/exchange.py:90) 3", f"{LOOP_FRAMES} 2",
                            '{"a broken": "line"}'])
    assert total == 5
    assert counts[LOOP] == 2 and sum(n for name, n in counts.items() if name.startswith("edge")) == 3
