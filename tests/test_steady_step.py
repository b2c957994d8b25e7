"""``generate()``'s compiled step skips dynamo's guards once steady (``headmix.models.steady``), and only then.

The danger of skipping guards is a stale compiled graph run on inputs it was not compiled for, silently. These tests
run the shortcut where that would show: a different shape or argument after a steady run (the wrapper must check the
guards again and compile), a sliding-window ring that wraps in the middle of a generation, every attention kind.
"""

from __future__ import annotations

import pytest
import torch
from test_generate_static import KINDS, NEW, compiled_greedy, greedy, prompts, small_model

from headmix.models import DCFormerForCausalLM, steady

needs_stance = pytest.mark.skipif(not steady._stance_can_skip_guards(),
                                  reason="torch.compiler.set_stance(skip_guard_eval_unsafe=) needs torch >= 2.6")


def counting_compile():
    """A compiled function ``x * n`` whose backend records each compilation (and runs the captured graph)."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    return torch.compile(lambda x, n: x * n, backend=backend, dynamic=False), graphs


@needs_stance
def test_guards_are_skipped_only_while_the_calls_are_steady():
    torch._dynamo.reset()
    fn, graphs = counting_compile()
    step = steady.SteadyStep(fn, steady_after=2)
    x = torch.randn(3)
    for _ in range(5):  # compile, two checked calls, then two calls without guards
        assert torch.equal(step(x, 2), x * 2)
    assert len(graphs) == 1 and step.steady_calls == 2
    y = torch.randn(5)  # a new shape: with the guards skipped, the graph for 3 numbers would run
    assert torch.equal(step(y, 2), y * 2) and len(graphs) == 2 and step.steady_calls == 2
    assert torch.equal(step(y, 3), y * 3) and len(graphs) == 3  # a new Python number (static: one graph each)
    for _ in range(3):
        step(y, 3)
    assert step.steady_calls == 3
    x64 = x.double()
    assert torch.equal(step(x64, 3), x64 * 3) and step.steady_calls == 3  # a new dtype


def test_guards_stay_on_when_switched_off(monkeypatch):
    monkeypatch.setattr(steady, "SKIP_GUARDS", False)
    torch._dynamo.reset()
    fn, graphs = counting_compile()
    step = steady.SteadyStep(fn)
    for _ in range(6):
        step(torch.ones(2), 2)
    assert step.steady_calls == 0 and len(graphs) == 1


@needs_stance
def test_generation_skips_guards_and_keeps_the_tokens(monkeypatch):
    """Every attention kind, a prompt shorter than the sliding window (the ring wraps during the generation, not
    before it), left padding: the steps after the first three run without guards and give the eager tokens."""
    steps = []
    get_compiled_call = DCFormerForCausalLM.get_compiled_call
    monkeypatch.setattr(DCFormerForCausalLM, "get_compiled_call",
                        lambda self, config=None: steps.append(get_compiled_call(self, config)) or steps[-1])
    model = small_model("pythia", attention=list(KINDS), num_hidden_layers=4, attention_options={"content_bias": True})
    ids, mask = prompts(pad=1)
    ids, mask = ids[:, -3:], mask[:, -3:]  # 3 positions, one of them padding; the window is 4
    tokens, graphs = compiled_greedy(model, ids, mask)
    assert torch.equal(tokens, greedy(model, ids, mask))
    assert graphs == 1 and len(steps) == 1
    assert steps[0].steady_calls == (NEW - 1) - (steady.STEADY_CALLS + 1)  # decoding steps less the checked ones


@needs_stance
def test_a_callers_stance_is_kept():
    """Under the caller's ``set_stance("force_eager")`` the step runs eagerly as asked: the shortcut, which sets a
    stance of its own, is not taken."""
    torch._dynamo.reset()
    fn, graphs = counting_compile()
    step = steady.SteadyStep(fn, steady_after=1)
    x = torch.randn(3)
    for _ in range(3):
        step(x, 2)
    assert step.steady_calls == 1
    with torch.compiler.set_stance("force_eager"):
        for _ in range(3):
            assert torch.equal(step(x, 2), x * 2)
    assert step.steady_calls == 1 and len(graphs) == 1
