"""memkit.models: the local-only loader, the GGUF -> safetensors cache, and clear errors for bad paths."""

from __future__ import annotations

import time

import pytest

from memkit.errors import InvalidInputError, MemkitError
from memkit.models import load_model


def test_missing_path_says_so(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InvalidInputError, match="no model weights"):
        load_model(tmp_path)


def test_weights_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"no config\.json"):
        load_model(tmp_path)


def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(MemkitError, match=r"not a \.gguf file"):
        load_model(f)


def test_several_ggufs_are_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(InvalidInputError, match="several GGUF"):
        load_model(tmp_path)


def test_plain_hf_folder_round_trip(tmp_path):
    """A saved tiny HF model (with a tokenizer) loads back through load_model with identical logits."""
    import torch

    from memkit.testing.tiny_models import tiny_model

    tok = _tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_model(tmp_path)
    ids = torch.tensor([tok2("Who's there? Nay, answer me.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert not loaded.training


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["Who's there? Nay, answer me: stand, and unfold yourself."] * 4,
                           trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


@pytest.mark.slow
def test_smollm2_gguf_conversion_cache(tmp_path, monkeypatch):
    """First load converts the bundled GGUF into the cache (same weights and tokenizer as the GGUF
    itself); the second load reads the cache quickly; a stale half-written folder is replaced."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memkit.models import converted_dir, load_smollm2
    from memkit.resources import smollm2_gguf

    monkeypatch.setenv("MEMKIT_CACHE", str(tmp_path))
    gguf = smollm2_gguf()
    target = converted_dir(gguf)
    assert target.parent == tmp_path
    target.mkdir()
    (target / "config.json").write_text("{half written")  # no completion marker: must be replaced

    model, tok = load_smollm2()
    assert (target / "memkit-converted.json").is_file() and (target / "model.safetensors").is_file()
    assert "quantization_config" not in (target / "config.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary folders left behind

    t0 = time.perf_counter()
    model2, tok2 = load_smollm2()
    assert time.perf_counter() - t0 < 10  # ~0.3 s on an idle machine once transformers is imported

    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                  dtype=torch.float32)
    direct_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    text = "The pass key is 71432. Remember it. What is the pass key?"
    assert tok2(text)["input_ids"] == direct_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.chat_template == direct_tok.chat_template
    ids = torch.tensor([tok2(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model2(ids).logits, direct(ids).logits)
        torch.testing.assert_close(model(ids).logits, model2(ids).logits)
    assert model2.config.max_position_embeddings == 8192 and model2.config.num_hidden_layers == 30
