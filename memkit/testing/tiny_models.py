"""Tiny random-weight decoders for fast CPU tests: Llama, Qwen2, Mistral, Gemma3 and GPT-2.

Each is a real transformers model class with a few layers and small widths (built in milliseconds, no
download). Gemma3 alternates sliding-window and global layers; Llama/Qwen2/Mistral use grouped K/V heads;
GPT-2 has learned absolute positions instead of RoPE. Weights are seeded, so runs are reproducible.
:func:`tiny_hf_folder` saves a tiny Llama with a small BPE tokenizer trained on a play, so the CLI can be
tested end to end on a real local HF folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

__all__ = ["ARCHITECTURES", "one_thread", "tiny_config", "tiny_model", "tiny_hf_folder", "repeating_ids"]

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3", "gpt2")


def tiny_config(arch: str, *, vocab_size: int = 256, layers: int = 4, max_positions: int = 2048) -> Any:
    """A small transformers config of architecture ``arch`` (one of :data:`ARCHITECTURES`)."""
    import transformers as tf

    common: dict[str, Any] = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=max_positions)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=max_positions, **common)
    if arch == "gemma3":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=24, layer_types=types,
                                   **common)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=layers, n_head=4, n_positions=max_positions,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                             eos_token_id=2)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")


def tiny_model(arch: str, *, seed: int = 0, dtype: Any = None, **config_kw: Any) -> Any:
    """A seeded random-weight causal LM of ``arch`` in eval mode (sdpa attention, float32 by default)."""
    import torch
    import transformers as tf

    cfg = tiny_config(arch, **config_kw)
    torch.manual_seed(seed)
    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM,
           "gemma3": tf.Gemma3ForCausalLM, "gpt2": tf.GPT2LMHeadModel}[arch]
    cfg._attn_implementation = "sdpa"
    model = cls(cfg)
    # Random init at the default std gives near-uniform attention; a larger std makes attention peaked so
    # tests notice when a key is missing or misplaced.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("q_proj" in name or "k_proj" in name or "c_attn" in name):
                p.normal_(0.0, 0.2)
    if model.generation_config is not None:  # random weights: never stop early on an "end" token
        model.generation_config.eos_token_id = None
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models are faster so, and a busy 2-core machine does not thrash."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiny_hf_folder(root: Any, *, play: str = "hamlet", chars: int = 12_000) -> tuple[Any, Any]:
    """Save a tiny random Llama + a 320-token BPE tokenizer trained on ``play`` under ``root``/model.

    Returns (model folder, text file holding the first ``chars`` characters of the play).
    """
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from memkit.corpora import play_text

    root = Path(root)
    text = play_text(play)[:chars]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    folder = root / "model"
    tok.save_pretrained(folder)
    tiny_model("llama", vocab_size=len(tok), max_positions=2048).save_pretrained(folder)
    (root / "text.txt").write_text(text)
    return folder, root / "text.txt"


def repeating_ids(n: int = 160, seed: int = 0, period: int = 40) -> Any:
    """(n,) token ids in 3..255 that repeat every ``period`` tokens: a document whose earlier text predicts its
    later text, so memory can help (training tests)."""
    import torch

    base = torch.randint(3, 256, (period,), generator=torch.Generator().manual_seed(seed))
    return base.repeat(n // period + 1)[:n]
