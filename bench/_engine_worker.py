"""One offline-generation measurement in a process of its own, for ``omni-bench engine``.

    python _engine_worker.py < job.json      # prints one JSON line: the measurement

Run by path (not as a module) so that it works in ``.venv-peers`` too, where omniops is not installed: it
imports only the stdlib until it knows its backend. job.json: {"backend": "omni"|"hf"|"vllm", "model": DIR,
"warm": [...], "prefill": [...], "generate": [...], "max_tokens": 64, "max_model_len": 1024}. Phases: load,
warm-up (max_tokens 4), prefill (max_tokens 1: every prompt's prefill plus one sampled token), generate
(``max_tokens`` greedy tokens, EOS ignored). Peak RSS from getrusage(RUSAGE_SELF) at the end: vLLM runs with
VLLM_ENABLE_V1_MULTIPROCESSING=0 (set by the parent) so that its engine core is in this process too.
"""

from __future__ import annotations

import json
import resource
import sys
import time


class _Omni:
    def __init__(self, model: str, max_model_len: int) -> None:
        from omniops.serving import LLM, SamplingParams

        self.SP = SamplingParams
        self.llm = LLM(model, dtype="bfloat16", max_model_len=max_model_len)

    def generate(self, prompts: list[str], max_tokens: int) -> tuple[int, int]:
        outs = self.llm.generate(prompts, self.SP(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        return sum(len(o.prompt_token_ids) for o in outs), sum(len(o.outputs[0].token_ids) for o in outs)


class _VLLM(_Omni):
    def __init__(self, model: str, max_model_len: int) -> None:
        from vllm import LLM, SamplingParams

        self.SP = SamplingParams
        self.llm = LLM(model=model, dtype="bfloat16", max_model_len=max_model_len)

    def generate(self, prompts: list[str], max_tokens: int) -> tuple[int, int]:
        sp = self.SP(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = self.llm.generate(prompts, sp, use_tqdm=False)
        return sum(len(o.prompt_token_ids) for o in outs), sum(len(o.outputs[0].token_ids) for o in outs)


class _HF:
    def __init__(self, model: str, max_model_len: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model, padding_side="left")
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()

    def generate(self, prompts: list[str], max_tokens: int) -> tuple[int, int]:
        enc = self.tok(prompts, return_tensors="pt", padding=True)
        with self.torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=self.tok.pad_token_id)
        new = out.shape[1] - enc["input_ids"].shape[1]
        return int(enc["attention_mask"].sum()), new * len(prompts)


BACKENDS = {"omni": _Omni, "hf": _HF, "vllm": _VLLM}


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def measure(job: dict) -> dict:
    t0 = time.perf_counter()
    eng = BACKENDS[job["backend"]](job["model"], job.get("max_model_len", 1024))
    res: dict = {"backend": job["backend"], "load_s": time.perf_counter() - t0}
    eng.generate(job["warm"], 4)
    t0 = time.perf_counter()
    res["prompt_tokens"], _ = eng.generate(job["prefill"], 1)
    res["prefill_s"] = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), _cpu_s()
    _, res["output_tokens"] = eng.generate(job["generate"], job["max_tokens"])
    res["generate_s"] = time.perf_counter() - t0
    # cores kept busy while generating (CPU time / wall time; spin-waiting OpenMP threads count as busy)
    res["cpu_util"] = (_cpu_s() - c0) / res["generate_s"]
    res["prefill_tok_s"] = res["prompt_tokens"] / res["prefill_s"]
    res["output_tok_s"] = res["output_tokens"] / res["generate_s"]
    res["num_prompts"] = len(job["generate"])
    runner = getattr(getattr(getattr(eng, "llm", None), "engine", None), "runner", None)
    if isinstance(getattr(runner, "compile_report", None), str):
        res["compile"] = runner.compile_report
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return res


def main() -> None:
    job = json.load(sys.stdin)
    res = measure(job)
    sys.stdout.flush()
    print("\n" + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
