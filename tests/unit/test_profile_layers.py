"""The profile summary (tests/bench/profile_layers.py) counts each sample under its innermost layer."""

from __future__ import annotations

from tests.bench.profile_layers import IDLE, LOOP, OTHER, layer, shares

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


def test_a_compiled_function_counts_under_the_layer_of_its_source_module() -> None:
    stack = [*LOOP_FRAMES.split(";"), "task_step (_asynciomodule.c)",
             "CPyDef_exchange___serve_gen_____mypyc_generator_helper__ (__native_ab12.c)",
             "CPyDunder_am_sendrate_limit_____call___3_RateLimit_gen (__native_ab12.c)"]
    assert layer(stack).startswith("policy chain")
    stack.append("CPyDef_connection___request_H1Connection_gen_____mypyc_generator_helper__ (__native_ab12.c)")
    assert layer(stack).startswith("upstream client")
    assert layer([*LOOP_FRAMES.split(";"), "CPyDef_protocol___EdgeProtocol___write (x.c)"]).startswith("edge")


def test_threads_asleep_in_a_wait_are_no_cpu_and_left_out_of_the_total() -> None:
    asleep = "thread_run (threadmodule.c);Condition.wait (threading.py:324);PyThread_acquire_lock_timed (thread.c)"
    assert layer(asleep.split(";")) == IDLE
    counts, total = shares([f"{asleep} 70", f"{LOOP_FRAMES} 30"])
    assert (total, counts[IDLE], counts[LOOP]) == (30, 70, 30)
