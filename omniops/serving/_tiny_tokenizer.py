"""The byte-level BPE tokenizer of the tiny checkpoints (see ``tiny.py``): trained with ``tokenizers`` on text
generated here from a seeded RNG, so nothing is downloaded and the same vocab size always gives the same
tokenizer. The corpus mixes pseudo-words, numbers, punctuation, accented Latin, CJK and emoji, so that merges
span multi-byte characters and unseen text still encodes (byte-level: every byte is in the base alphabet)."""

from __future__ import annotations

import json
import random
from pathlib import Path

BOS, EOS, PAD, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)  # ids 0..4, in this order

# ChatML, as Qwen's templates render it (no system prompt injected)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CONSONANTS = "b c d f g h j k l m n p r s t v w z ch sh th qu".split()
_VOWELS = "a e i o u y ai ea ou ie é ü ö à".split()
_EXTRA = ["中文", "你好", "世界", "模型", "🙂", "🚀", "🎉", "naïve", "Straße", "über", "café", "niño", "Ωmega",
          "Привет"]
_PUNCT = [".", ",", "!", "?", ";", ":", " -", " (ok)", "'s", '"']


def corpus(seed: int = 0, sentences: int = 4000) -> list[str]:
    rng = random.Random(seed)
    # ~3000 distinct pseudo-words: enough distinct pairs for a 4096-entry vocab (a small fixed word list runs out
    # of merges once each word is one token)
    words = ["".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(1, 4)))
             for _ in range(3000)]
    out = []
    for _ in range(sentences):
        ws = [rng.choice(words) if rng.random() > 0.08 else rng.choice(_EXTRA) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.4:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 10 ** rng.randint(1, 6))))
        s = " ".join(ws)
        out.append(s[0].upper() + s[1:] + rng.choice(_PUNCT))
    return out


def train(vocab_size: int):
    """A ``tokenizers.Tokenizer`` with at most ``vocab_size`` entries, the special tokens first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} < the byte alphabet + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    return tok


def write(out: Path, vocab_size: int, model_max_length: int) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json in ``out``; returns the token ids of
    bos / eos / pad / im_start / im_end (keys without the brackets)."""
    tok = train(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    names = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    # the chat template in tokenizer_config.json (not chat_template.jinja): what transformers 4 readers look at too
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "unk_token": None, "add_bos_token": False,
           "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
           "additional_special_tokens": [IM_START, IM_END], "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({**names, "additional_special_tokens": [IM_START, IM_END]}, indent=2) + "\n")
    return {t.strip("<|>"): tok.token_to_id(t) for t in SPECIAL_TOKENS}
