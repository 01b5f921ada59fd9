"""The runner compiled with backend="omni": the same greedy tokens as eager (and so as HF), one graph for
every batch size, and the measured eager-vs-compiled choice."""

from __future__ import annotations

import pytest
from torch._dynamo.utils import counters

from omniops.serving import LLM, SamplingParams
from tests.serving.conftest import mixed_prompts

pytestmark = pytest.mark.compile


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_compiled_runner_same_tokens_no_recompiles(arch, checkpoint):
    path = checkpoint(arch)
    eager = LLM(path, max_model_len=256, kv_cache_memory=0.05, enforce_eager=True)
    llm = LLM(path, max_model_len=256, kv_cache_memory=0.05)  # enforce_eager=False: compiled and measured
    runner = llm.engine.runner
    assert runner.compiled_fn is not None and "decode step" in runner.compile_report
    runner.compiled = runner.compiled_fn  # whatever the measurement chose, test the compiled path
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    graphs = counters["stats"]["unique_graphs"]
    for n in (1, 3, 7, 12):  # new batch sizes, prompt lengths and table widths
        prompts = mixed_prompts(n, seed=n)
        want = [o.outputs[0].token_ids for o in eager.generate(prompts, sp)]
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, sp)] == want
    assert counters["stats"]["unique_graphs"] == graphs  # warm-up built every graph serving needs
    llm.engine.kv.check_all_free()


def test_mla_model_stays_eager_and_says_why(checkpoint):
    llm = LLM(checkpoint("deepseek_v3"), max_model_len=256, kv_cache_memory=0.05)
    assert llm.engine.runner.compiled is None and "MLA" in llm.engine.runner.compile_report
