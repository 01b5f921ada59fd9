"""The runner compiled with backend="omni": the same greedy tokens as eager (and so as HF), one graph for
every batch size, and the measured eager-vs-compiled choice. DeepSeek-V3 compiles its decode-only steps."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from omniops.serving import LLM, SamplingParams
from tests.serving.conftest import mixed_prompts

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "deepseek_v3"])
def test_compiled_runner_same_tokens_no_recompiles(arch, checkpoint):
    path = checkpoint(arch)
    eager = LLM(path, max_model_len=256, kv_cache_memory=0.05, enforce_eager=True)
    llm = LLM(path, max_model_len=256, kv_cache_memory=0.05)  # enforce_eager=False: compiled and measured
    runner = llm.engine.runner
    assert runner.compiled_fn is not None and "decode step" in runner.compile_report
    runner.compiled = runner.compiled_fn  # whatever the measurement chose, test the compiled path
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    graphs, steps = counters["stats"]["unique_graphs"], runner.compiled_steps
    for n in (1, 3, 7, 12):  # new batch sizes, prompt lengths and table widths
        prompts = mixed_prompts(n, seed=n)
        want = [o.outputs[0].token_ids for o in eager.generate(prompts, sp)]
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == want
    assert counters["stats"]["unique_graphs"] == graphs  # warm-up built every graph serving needs
    assert runner.compiled_steps - steps >= 4 * 7  # at least every decode step ran compiled
    llm.engine.kv.check_all_free()
