"""Build a tiny random-weight Llama with a trained byte-level BPE tokenizer.

Tests and the demo need a real Hugging Face model directory but this machine has
no hub access, so we make one locally in a few seconds.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Head size 64: the vLLM CPU attention backend refuses head sizes below 32.
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
# Large initial weights give well separated logits, so greedy decoding does not
# flip between near-tied tokens when the batch composition changes.
INIT_STD = 0.5
# ChatML, like SmolLM2's (without its default system message), so chat workloads run on
# the tiny model too. The markers stay plain text here: no new special tokens, so the
# vocabulary and weights made for a seed do not change.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "Claim: The Eiffel Tower is in Paris.\nVerdict: SUPPORTED",
    "Claim: Water boils at 50 degrees Celsius at sea level.\nVerdict: REFUTED",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Large language models run batch inference on opportunistic GPUs.",
    "HTCondor glideins keep the model context alive between batches.",
]


def _training_text() -> list[str]:
    words = " ".join(_CORPUS).split()
    # Repeat with shuffled word order so BPE learns merges across the vocabulary.
    return _CORPUS + [" ".join(words[i:] + words[:i]) for i in range(len(words))]


def make_tiny_model(out_dir: str | Path, vocab_size: int = 1024, seed: int = 0) -> Path:
    """Write config, safetensors weights and tokenizer files to ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        initializer_range=INIT_STD,
        **{**TINY_CONFIG, "torch_dtype": "float32"},  # the older name the tests' model was made with
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "pcm_tiny_model.json").write_text(json.dumps({"seed": seed, "vocab_size": vocab_size}))
    for f in out.iterdir():  # safetensors writes 0600; glideins run as another user
        f.chmod(0o644)
    return out
