"""omniops.serving.tiny: the random-weight checkpoints load in transformers like real ones (no missing or
unexpected keys), generate varied text, and every layout (per-expert, fused, sharded) gives the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omniops.serving.tiny import ARCHS, config_kwargs, write_tiny_checkpoint

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

MAIN = ("llama", "qwen3_moe", "deepseek_v3")
MOE = ("qwen3_moe", "deepseek_v3")
PROMPTS = ("Hello world, this is", "Le café est über 中文 🙂", "1 2 3 4 5")


def _load(path: Path, **kw):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    # a key that the checkpoint misses would be randomly initialised and still "load"
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    # The weights are mmapped from the file at its offsets, which differ between layouts; some CPUs' GEMMs round
    # differently at different alignments (AMD Zen 5: 5e-7). Fresh (aligned) copies keep the comparisons exact.
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    return model.eval()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache = {}

    def get(arch: str, **kw) -> Path:
        key = (arch, *sorted(kw.items()))
        if key not in cache:
            name = "-".join(str(x) for x in (arch, *kw.values()))
            cache[key] = write_tiny_checkpoint(tmp_path_factory.mktemp(name), arch, **kw)
        return cache[key]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_varied(ckpt, arch):
    path = ckpt(arch)
    model, tok = _load(path), AutoTokenizer.from_pretrained(path)
    outs = []
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        new = out[0, enc.input_ids.shape[1]:].tolist()
        assert len(new) == 32
        # HF's own N(0, 0.02) init gets as few as 3 distinct tokens here
        assert len(set(new)) >= 16, (prompt, new)
        outs.append(tuple(new))
    assert len(set(outs)) == len(PROMPTS), "different prompts, same continuation"


def test_bfloat16_generation_is_varied(ckpt):
    path = ckpt("deepseek_v3", dtype="bfloat16")
    model, tok = _load(path), AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    enc = tok(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert len(set(out[0, enc.input_ids.shape[1]:].tolist())) >= 16


@pytest.mark.parametrize("arch", MOE)
def test_router_picks_every_expert(ckpt, arch):
    model = _load(ckpt(arch))
    picked = []
    gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
    assert gates
    for g in gates:  # the routers return (logits, weights, expert ids)
        g.register_forward_hook(lambda mod, args, out: picked.append(out[-1]))
    ids = torch.randint(5, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    _logits(model, ids)
    assert len(picked) == len(gates)
    for top in picked:
        assert torch.unique(top).numel() == model.config.num_local_experts
        assert torch.unique(top.sort(-1).values, dim=0).shape[0] > 8, "most tokens route to the same experts"


@pytest.mark.parametrize("arch", MAIN)
def test_tokenizer(ckpt, arch):
    path = ckpt(arch)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"]
    text = "Grüße, naïve café! 中文 and 한국어 😀 🚀 x=3.14;\n\ttabs"  # Hangul and 😀 are not in the training corpus
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()), "no merges: every byte its own token"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (cfg["bos_token_id"], cfg["eos_token_id"],
                                                                      cfg["pad_token_id"])
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est le café?"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nOù est le café?<|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert not tok.apply_chat_template(msgs, tokenize=False).endswith("assistant\n")
    chat_ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert chat_ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 2  # special tokens stay single tokens


@pytest.mark.parametrize("arch", MAIN)
def test_layouts_and_shards_load_to_same_logits(ckpt, arch):
    ref_path = ckpt(arch)
    ids = torch.randint(5, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = _logits(_load(ref_path), ids)
    for kw in ({"expert_layout": "fused"}, {"shards": 2}, {"shards": 3, "expert_layout": "fused"}):
        path = ckpt(arch, **kw)
        assert torch.equal(_logits(_load(path), ids), ref), kw
        if kw.get("shards"):
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = sorted(p.name for p in path.glob("*.safetensors"))
            assert files == [f"model-{i:05d}-of-{kw['shards']:05d}.safetensors" for i in range(1, kw["shards"] + 1)]
            assert sorted(set(index["weight_map"].values())) == files
            assert index["weight_map"].keys() == _tensors(path).keys()
    other_seed = _logits(_load(ckpt(arch, seed=1)), ids)
    assert not torch.allclose(other_seed, ref)


def test_expert_layouts_on_disk(ckpt):
    cfg = config_kwargs("deepseek_v3")
    E, I, H = cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]  # noqa: E741
    per = _tensors(ckpt("deepseek_v3"))
    fused = _tensors(ckpt("deepseek_v3", expert_layout="fused"))
    p = "model.layers.1.mlp.experts"
    assert per[f"{p}.0.gate_proj.weight"].shape == per[f"{p}.0.up_proj.weight"].shape == (I, H)
    assert per[f"{p}.{E - 1}.down_proj.weight"].shape == (H, I)
    assert not any(".experts.gate_up_proj" in k for k in per)
    assert fused[f"{p}.gate_up_proj"].shape == (E, 2 * I, H) and fused[f"{p}.down_proj"].shape == (E, H, I)
    assert torch.equal(fused[f"{p}.gate_up_proj"][3, :I], per[f"{p}.3.gate_proj.weight"])  # gate rows first
    assert torch.equal(fused[f"{p}.gate_up_proj"][3, I:], per[f"{p}.3.up_proj.weight"])
    # first_k_dense_replace=1: layer 0 is a dense MLP; the MoE layers have the shared expert and the router bias
    assert "model.layers.0.mlp.gate_proj.weight" in per and not any(k.startswith("model.layers.0.mlp.e") for k in per)
    assert per["model.layers.1.mlp.shared_experts.gate_proj.weight"].shape == (I * cfg["n_shared_experts"], H)
    bias = per["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.shape == (E,) and bias.abs().min() > 0
    assert not torch.equal(per["lm_head.weight"], per["model.embed_tokens.weight"])


@pytest.mark.parametrize("arch", MOE)
def test_per_expert_is_what_save_pretrained_writes(ckpt, arch, tmp_path):
    path = ckpt(arch)
    _load(path).save_pretrained(tmp_path)
    assert _tensors(tmp_path).keys() == _tensors(path).keys()


def test_bfloat16_checkpoint(ckpt):
    path = ckpt("deepseek_v3", dtype="bfloat16")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    for k, t in _tensors(path).items():
        assert t.dtype == (torch.float32 if k.endswith("e_score_correction_bias") else torch.bfloat16), k


def test_config_fields(ckpt):
    ds = AutoConfig.from_pretrained(ckpt("deepseek_v3"))
    assert ds.architectures == ["DeepseekV3ForCausalLM"]
    assert (ds.topk_method, ds.scoring_func, ds.n_group, ds.topk_group) == ("noaux_tc", "sigmoid", 4, 2)
    assert ds.routed_scaling_factor != 1 and ds.norm_topk_prob and ds.q_lora_rank != ds.kv_lora_rank
    assert ds.max_position_embeddings >= 2048 and not ds.tie_word_embeddings
    q = json.loads((ckpt("qwen3_moe") / "config.json").read_text())
    assert q["num_experts"] == 8 and q["num_attention_heads"] != q["num_key_value_heads"]
    assert q["rope_theta"] == 10000.0
    assert AutoConfig.from_pretrained(ckpt("qwen3_moe")).num_experts == 8


@pytest.mark.parametrize("arch", MOE)
def test_bench_preset_shapes(arch):
    kw = config_kwargs(arch, "bench")
    config = transformers.CONFIG_MAPPING[arch](**kw)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (1024, 4, 4096)
    assert (config.num_local_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (32, 4, 384)
    if arch == "deepseek_v3":
        assert (config.kv_lora_rank, config.qk_rope_head_dim, config.q_lora_rank) == (512, 64, 384)
        assert config.n_routed_experts % config.n_group == 0 and config.topk_group <= config.n_group


def test_rewrite_leaves_no_stale_shards(tmp_path):
    write_tiny_checkpoint(tmp_path, "llama", shards=3)
    write_tiny_checkpoint(tmp_path, "llama")
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    _load(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        write_tiny_checkpoint(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="shards"):
        write_tiny_checkpoint(tmp_path, "llama", shards=10_000)


def test_cli(tmp_path):
    out = tmp_path / "ck"
    cmd = [sys.executable, "-m", "omniops.serving.tiny", str(out), "--arch", "qwen3_moe", "--dtype", "bfloat16",
           "--shards", "2", "--expert-layout", "fused", "--seed", "3"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "model.layers.0.mlp.experts.gate_up_proj" in json.loads(
        (out / "model.safetensors.index.json").read_text())["weight_map"]
    ref = _tensors(write_tiny_checkpoint(tmp_path / "api", "qwen3_moe", dtype="bfloat16", seed=3,
                                         expert_layout="fused"))
    got = _tensors(out)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
