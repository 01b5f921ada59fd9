"""Random-weight Hugging Face checkpoints that load like real ones (nothing downloaded): config.json,
generation_config.json, safetensors weights (one file or shards + index) and a byte-level BPE tokenizer with a
ChatML chat template, for Llama, Qwen2/Qwen3 (dense), Qwen3-MoE and DeepSeek-V3 (MLA, grouped sigmoid routing).

    python -m omniops.serving.tiny OUT --arch deepseek_v3 [--preset tiny|bench] [--dtype bfloat16] [--shards 2]

Presets: ``tiny`` is for unit tests (hidden 128, vocab 512, every feature of the architecture exercised),
``bench`` has the benchmarks' shapes (hidden 1024, 4 layers, vocab 4096).

Expert layouts: ``per_expert`` is what released checkpoints hold (``mlp.experts.{e}.{gate,up,down}_proj.weight``,
also what transformers 5's ``save_pretrained`` writes back); ``fused`` is transformers 5's in-memory form
(``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows first, and ``mlp.experts.down_proj`` [E, H, I]).
transformers loads both to the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

from omniops.serving import _tiny_tokenizer

ARCHS = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")
PRESETS = ("tiny", "bench")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("per_expert", "fused")

_COMMON = {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 10000.0}
_DENSE = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 32, "intermediate_size": 256, "vocab_size": 512},
    "bench": {"hidden_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 16, "num_key_value_heads": 4,
              "head_dim": 64, "intermediate_size": 2816, "vocab_size": 4096},
}
_QWEN3_MOE = {
    "tiny": {**_DENSE["tiny"], "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "bench": {**_DENSE["bench"], "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 384},
}
# Keys DeepSeek's own config.json has that transformers' DeepseekV3Config lacks: other loaders (vLLM) read them.
_DEEPSEEK_EXTRA = {"topk_method": "noaux_tc", "scoring_func": "sigmoid", "moe_layer_freq": 1, "ep_size": 1}
_DEEPSEEK_V3 = {
    # q_lora_rank != kv_lora_rank and nope != rope so that a swapped dimension fails loudly
    "tiny": {"hidden_size": 128, "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4,
             "num_key_value_heads": 4, "q_lora_rank": 96, "kv_lora_rank": 64, "qk_rope_head_dim": 16,
             "qk_nope_head_dim": 32, "v_head_dim": 32, "intermediate_size": 256, "moe_intermediate_size": 64,
             "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
             "vocab_size": 512},
    # vLLM's CPU MLA kernels need kv_lora_rank 512 and qk_rope_head_dim 64 (DeepSeek-V3's own)
    "bench": {"hidden_size": 1024, "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 8,
              "num_key_value_heads": 8, "q_lora_rank": 384, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
              "qk_nope_head_dim": 128, "v_head_dim": 128, "intermediate_size": 2048, "moe_intermediate_size": 384,
              "n_routed_experts": 32, "num_experts_per_tok": 4, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
              "vocab_size": 4096},
}
_PRESETS = {
    "llama": {p: dict(_DENSE[p]) for p in PRESETS},
    # Qwen2 derives head_dim from hidden / heads and always has q/k/v biases
    "qwen2": {p: {k: v for k, v in _DENSE[p].items() if k != "head_dim"} for p in PRESETS},
    "qwen3": {p: dict(_DENSE[p]) for p in PRESETS},
    "qwen3_moe": {p: _QWEN3_MOE[p] | {"norm_topk_prob": True} for p in PRESETS},
    "deepseek_v3": {p: _DEEPSEEK_V3[p] | _DEEPSEEK_EXTRA | {"routed_scaling_factor": 2.5, "norm_topk_prob": True,
                                                           "num_nextn_predict_layers": 0} for p in PRESETS},
}


def config_kwargs(arch: str, preset: str = "tiny", overrides: dict | None = None) -> dict:
    """The config.json fields of ``arch`` at ``preset`` (before token ids and dtype), with ``overrides``."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} not in {ARCHS}")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} not in {PRESETS}")
    return {**_COMMON, **_PRESETS[arch][preset], **(overrides or {})}


def _init(name: str, shape: torch.Size, g: torch.Generator, layers: int) -> torch.Tensor:
    """Weights that keep a random model's greedy output varied: HF's N(0, 0.02) everywhere makes the residual
    stream too weak to move the argmax, so tiny random models repeat one token. Embeddings are N(0, 1), every
    projection N(0, 1/fan_in) (unit-variance outputs, so the routers' logits differ per token and pick different
    experts), the residual branches' outputs shrunk by 1/sqrt(2 * layers) so they perturb rather than drown the
    embedding. Norm weights are near, not at, 1 so that a loader which drops one gets other logits."""
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=g) * 0.03
    if 0 in shape:  # e.g. DeepSeek's shared-expert MLP with n_shared_experts=0
        return torch.empty(shape)
    if len(shape) == 1:
        if name.endswith(".bias"):
            return torch.randn(shape, generator=g) * 0.1
        return torch.empty(shape).uniform_(0.8, 1.2, generator=g)
    std = 1.0 if name.endswith("embed_tokens.weight") else 1 / math.sqrt(shape[-1])
    if re.search(r"(o_proj|down_proj)(\.weight)?$", name):
        std /= math.sqrt(2 * layers)
    return torch.randn(shape, generator=g) * std


def _per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's fused experts split into released checkpoints' per-expert linears."""
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"(.*\.experts)\.(gate_up_proj|down_proj)", key)
        if m is None:
            out[key] = t
            continue
        for e, w in enumerate(t):
            if m[2] == "down_proj":
                out[f"{m[1]}.{e}.down_proj.weight"] = w.clone()
            else:
                gate, up = w.chunk(2)
                out[f"{m[1]}.{e}.gate_proj.weight"], out[f"{m[1]}.{e}.up_proj.weight"] = gate.clone(), up.clone()
    return out


def _natural(key: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


def _split(keys: list[str], sizes: dict[str, int], n: int) -> list[list[str]]:
    """``keys`` in order cut into ``n`` non-empty runs of about equal bytes."""
    if not 1 <= n <= len(keys):
        raise ValueError(f"shards must be in [1, {len(keys)}], got {n}")
    shards, cur, cur_bytes, left_bytes = [], [], 0, sum(sizes.values())
    for i, key in enumerate(keys):
        cur.append(key)
        cur_bytes += sizes[key]
        after = n - len(shards) - 1  # shards still to open after this one
        if after and (cur_bytes >= left_bytes / (after + 1) or len(keys) - i - 1 == after):
            shards.append(cur)
            left_bytes -= cur_bytes
            cur, cur_bytes = [], 0
    return [*shards, cur]


def _save_weights(out: Path, state: dict[str, torch.Tensor], shards: int) -> None:
    from safetensors.torch import save_file

    for old in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        old.unlink(missing_ok=True)  # a rerun with other shards must not leave stale files
    keys = sorted(state, key=_natural)
    if shards == 1:
        save_file({k: state[k] for k in keys}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    sizes = {k: state[k].numel() * state[k].element_size() for k in keys}
    weight_map = {}
    for i, part in enumerate(_split(keys, sizes, shards)):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tiny_checkpoint(out_dir: str | Path, arch: str, *, preset: str = "tiny", dtype: str = "float32",
                          seed: int = 0, shards: int = 1, expert_layout: str = "per_expert",
                          overrides: dict | None = None) -> Path:
    """Writes a random-weight checkpoint of ``arch`` into ``out_dir`` (created; our files in it overwritten) and
    returns its path. The weights depend only on (arch, preset, overrides, seed); ``dtype`` rounds them."""
    import transformers
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {tuple(DTYPES)}")
    if expert_layout not in LAYOUTS:
        raise ValueError(f"expert_layout {expert_layout!r} not in {LAYOUTS}")
    kw = config_kwargs(arch, preset, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _tiny_tokenizer.write(out, kw["vocab_size"], kw["max_position_embeddings"])
    kw.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    config = transformers.CONFIG_MAPPING[arch](**kw)
    # meta device: only the names and shapes are needed, and skipping HF's init keeps the bench preset fast
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    state = {k: _init(k, t.shape, g, config.num_hidden_layers) for k, t in model.state_dict().items()}
    # DeepSeek keeps e_score_correction_bias in fp32 in its bf16 / fp8 releases
    state = {k: t if k.endswith("e_score_correction_bias") else t.to(DTYPES[dtype]) for k, t in state.items()}
    _save_weights(out, _per_expert(state) if expert_layout == "per_expert" else state, shards)

    config.architectures = [type(model).__name__]
    config.dtype = dtype
    cfg = config.to_diff_dict()
    # transformers 4 names too, for loaders that still read them (vLLM on transformers 4): torch_dtype, rope_theta,
    # and Qwen3-MoE's num_experts (transformers 5 writes num_local_experts, which 4 ignores: it would build 128)
    cfg["torch_dtype"] = dtype
    cfg["rope_theta"] = kw["rope_theta"]
    if arch == "qwen3_moe":
        cfg["num_experts"] = kw["num_experts"]
    (out / "config.json").write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")
    gen = {"bos_token_id": ids["bos"], "eos_token_id": [ids["eos"], ids["im_end"]], "pad_token_id": ids["pad"],
           "do_sample": False, "transformers_version": transformers.__version__}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m omniops.serving.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="checkpoint folder (created; its checkpoint files are overwritten)")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--expert-layout", default="per_expert", choices=LAYOUTS)
    a = p.parse_args(argv)
    path = write_tiny_checkpoint(a.out, a.arch, preset=a.preset, dtype=a.dtype, seed=a.seed, shards=a.shards,
                                 expert_layout=a.expert_layout)
    print(path)


if __name__ == "__main__":
    main()
