"""Run with .venv-peers' python by test_vllm_plugin_offline.py: vLLM's offline ``LLM`` (plugin loaded by vLLM
itself) on one checkpoint, profiled; prints ``RESULT <json completions>``. Not a test module."""

from __future__ import annotations

import json
import sys


def main() -> None:
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    llm = LLM(spec["model"], dtype="float32", max_model_len=1024, profiler_config=spec["profiler_config"],
              **spec["llm_kwargs"])
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True)
    llm.start_profile()
    outs = llm.generate(spec["prompts"], params)
    llm.stop_profile()
    print("RESULT " + json.dumps([o.outputs[0].text for o in outs]), flush=True)


if __name__ == "__main__":  # vLLM starts its engine with spawn: the children re-import this file
    main()
