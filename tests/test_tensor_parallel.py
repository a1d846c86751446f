"""Tensor parallelism (--tp 2, gloo on the CPU, one thread per rank) computes what one process computes.

- Loading: each rank's slices put back together are the whole model's weights, for checkpoints
  fused already (Phi-3) and with q/k/v biases (Qwen2); heads that do not split are refused in one line.
- Forward: on tiny random models with KV heads that split (4 heads / 2 KV) and that must be replicated
  (4 / 1, tied embeddings), rank 0's logits equal one process's within 1e-4 (float32), step after
  step on shuffled pages, and rank 0's pool holds its own KV heads' K/V.
- Engine: the same 32 greedy tokens and prompt log-probs as tp=1.
- Failure: a rank killed mid-step fails the caller within seconds (naming it); the server's watchdog
  restarts worker and ranks, and the next request succeeds.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_tiny_checkpoint
from server_process import KEY, TINY_ARGS, running_server, wait_healthy

from radixrt import Engine
from radixrt.attention.base import ForwardBatch
from radixrt.config import EngineConfig
from radixrt.frontend.errors import RequestError
from radixrt.model.config import ModelConfig
from radixrt.model.llama import LlamaForCausalLM
from radixrt.model.loader import iter_weights, read_model_config
from radixrt.model.parallel import ShardLayout, TensorParallel, TensorParallelError
from radixrt.runner.model_runner import ModelRunner
from radixrt.runner.tensor_parallel import make_runner

TP = 2
PROMPT = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 31, 8]
# Random tiny models whose greedy continuation varies (a tied one needs larger weights not to echo its input).
VARIANTS = {
    "kv-split-untied": dict(family="llama", tie=False, seed=1, num_key_value_heads=2),
    "kv-replicated-tied": dict(family="llama", tie=True, seed=0, num_key_value_heads=1, initializer_range=0.3),
}
FP32 = dict(rtol=1e-4, atol=1e-4)  # as the parity tests against transformers (test_model_parity.py)
ENGINE_ARGS = dict(page_size=4, num_threads=TP, chunked_prefill_size=8, max_total_tokens=1024)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {name: make_tiny_checkpoint(tmp_path_factory.mktemp(name), **spec) for name, spec in VARIANTS.items()}


def steps() -> list[ForwardBatch]:
    """Prefills of 13 and 7 tokens on pages handed out back to front, then one decode token each."""
    prompts, tables, page = [list(range(3, 16)) + [7], [40, 41, 42, 43, 44, 45, 46, 7]], [[15, 9, 3, 12], [6, 1]], 4
    batches = []
    for prefix, new in (([0, 0], [13, 7]), ([13, 7], [1, 1])):
        spans = [range(start, start + n) for start, n in zip(prefix, new)]
        batches.append(ForwardBatch(
            input_ids=torch.tensor([prompts[r][p] for r, span in enumerate(spans) for p in span]),
            positions=torch.tensor([p for span in spans for p in span]),
            out_slots=torch.tensor([tables[r][p // page] * page + p % page
                                    for r, span in enumerate(spans) for p in span]),
            qo_indptr=[0, new[0], new[0] + new[1]],
            prefix_lens=prefix,
            seq_lens=[p + n for p, n in zip(prefix, new)],
            page_tables=tables,
            logits_indices=torch.arange(sum(new)),
            page_size=page,
        ))  # fmt: skip
    return batches


def rank_models(folder: Path) -> tuple[LlamaForCausalLM, list[LlamaForCausalLM]]:
    """The whole model and each rank's slice of it, loaded in this process (loading needs no group)."""
    config = read_model_config(folder)
    whole = LlamaForCausalLM(config)
    whole.load_weights(iter_weights(folder, torch.float32))
    ranks = [LlamaForCausalLM(config, TensorParallel(rank, TP)) for rank in range(TP)]
    for model in ranks:
        model.load_weights(iter_weights(folder, torch.float32))
    return whole, ranks


@pytest.mark.parametrize("family", ["phi3", "qwen2"])
def test_rank_slices_put_together_are_the_whole_model(tmp_path, family):
    """Phi-3's checkpoint has qkv_proj / gate_up_proj fused already; Qwen2 has q/k/v biases."""
    folder = make_tiny_checkpoint(tmp_path, family, num_key_value_heads=2)
    whole, ranks = rank_models(folder)
    c = whole.config
    q, kv, inner = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size

    def joined(param: str, sizes: list[int] | None = None, dim: int = 0) -> torch.Tensor:
        """The ranks' tensors joined part by part (q | k | v, gate | up) along `dim`."""
        parts = [dict(r.named_parameters())[param].data for r in ranks]
        if sizes is None:
            return torch.cat(parts, dim)
        pieces = [p.split([s // TP for s in sizes], dim) for p in parts]
        return torch.cat([torch.cat([pc[i] for pc in pieces], dim) for i in range(len(sizes))], dim)

    params = dict(whole.named_parameters())
    for layer in range(c.num_layers):
        prefix = f"layers.{layer}."
        torch.testing.assert_close(joined(prefix + "self_attn.qkv_proj.weight", [q, kv, kv]),
                                   params[prefix + "self_attn.qkv_proj.weight"], rtol=0, atol=0)  # fmt: skip
        if c.attention_bias:
            torch.testing.assert_close(joined(prefix + "self_attn.qkv_proj.bias", [q, kv, kv]),
                                       params[prefix + "self_attn.qkv_proj.bias"], rtol=0, atol=0)  # fmt: skip
        torch.testing.assert_close(joined(prefix + "self_attn.o_proj.weight", dim=1),
                                   params[prefix + "self_attn.o_proj.weight"], rtol=0, atol=0)  # fmt: skip
        torch.testing.assert_close(joined(prefix + "mlp.gate_up_proj.weight", [inner, inner]),
                                   params[prefix + "mlp.gate_up_proj.weight"], rtol=0, atol=0)  # fmt: skip
        torch.testing.assert_close(joined(prefix + "mlp.down_proj.weight", dim=1),
                                   params[prefix + "mlp.down_proj.weight"], rtol=0, atol=0)  # fmt: skip
        for rank in ranks:  # norms are whole on every rank
            norm = prefix + "input_layernorm.weight"
            torch.testing.assert_close(dict(rank.named_parameters())[norm], params[norm], rtol=0, atol=0)
    for name in ("embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(joined(name)[: c.vocab_size], params[name], rtol=0, atol=0)


def default_model_shapes() -> ModelConfig:
    """The default model's shapes (SmolLM2-135M: 9 heads, 3 KV heads, MLP 1536), with 2 layers."""
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                     num_attention_heads=9, num_key_value_heads=3).to_dict()  # fmt: skip
    return ModelConfig.from_hf_dict({**hf, "architectures": ["LlamaForCausalLM"]})


def test_replicated_kv_heads_are_the_ones_each_rank_uses():
    """8 query heads over 4 ranks with 2 KV heads: ranks 0, 1 hold KV head 0 (query heads 0-3), ranks 2, 3 head 1."""
    config = dataclasses.replace(default_model_shapes(), num_heads=8, num_kv_heads=2)
    layouts = [ShardLayout.of(config, rank, 4) for rank in range(4)]
    assert [(s.first_head, s.num_heads, s.first_kv_head, s.num_kv_heads) for s in layouts] == [
        (0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)
    ]  # fmt: skip


def test_heads_that_do_not_split_are_refused_in_one_line():
    """As SGLang and vLLM: the default model's 9 heads do not go over 2 ranks; nor do 3 KV heads."""
    config = default_model_shapes()
    with pytest.raises(TensorParallelError, match=r"^9 attention heads do not split over tensor-parallel size 2$"):
        ShardLayout.of(config, 0, 2)
    with pytest.raises(TensorParallelError, match="3 KV heads do not split over tensor-parallel size 2"):
        ShardLayout.of(dataclasses.replace(config, num_heads=6), 0, 2)
    ShardLayout.of(config, 0, 3)  # 9 heads, 3 KV heads over 3 ranks: fine


def test_default_model_at_tp2_fails_before_starting_ranks():
    started = time.monotonic()
    with pytest.raises(TensorParallelError, match="9 attention heads do not split over tensor-parallel size 2"):
        Engine(tp=2)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_one_process(checkpoints, variant):
    folder = checkpoints[variant]
    config = EngineConfig(model=str(folder), page_size=4, max_total_tokens=64, num_threads=TP)
    whole = ModelRunner(config, folder)
    group = make_runner(dataclasses.replace(config, tp_size=TP), folder)
    try:
        for batch, same in zip(steps(), steps()):
            torch.testing.assert_close(group.forward(same), whole.forward(batch), **FP32)
        shard = group.model.shard  # rank 0's KV heads (half, or the one it shares), in its own pool
        assert group.pool.k[0].shape[2] == shard.num_kv_heads == max(1, whole.pool.k[0].shape[2] // TP)
        heads = slice(shard.first_kv_head, shard.first_kv_head + shard.num_kv_heads)
        for layer in range(whole.model_config.num_layers):
            torch.testing.assert_close(group.pool.k[layer], whole.pool.k[layer][:, :, heads], **FP32)
            torch.testing.assert_close(group.pool.v[layer], whole.pool.v[layer][:, :, heads], **FP32)
    finally:
        group.close()
    assert [p.returncode for p in group.ranks.procs] == [0]  # told to stop, the rank left cleanly


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_greedy_tokens_equal_one_process(checkpoints, variant):
    params = dict(max_new_tokens=32, temperature=0, ignore_eos=True, prompt_logprobs=True)
    outputs = []
    for tp in (1, TP):
        with Engine(str(checkpoints[variant]), tp=tp, **ENGINE_ARGS) as engine:
            outputs.append(engine.generate(input_ids=PROMPT, sampling_params=params))
    one, group = outputs
    assert len(set(one.token_ids)) >= 10  # a continuation that varies: equal tokens mean something
    assert group.token_ids == one.token_ids
    torch.testing.assert_close(torch.tensor(group.prompt_logprobs[1:]), torch.tensor(one.prompt_logprobs[1:]), **FP32)


def test_rank_killed_mid_step_fails_the_caller_fast(checkpoints):
    engine = Engine(str(checkpoints["kv-split-untied"]), tp=TP, **ENGINE_ARGS)
    try:
        stream = engine.generate_stream(input_ids=PROMPT, sampling_params=dict(max_new_tokens=1000, ignore_eos=True))
        next(stream)
        rank = engine.worker.runner.ranks.procs[0]
        os.kill(rank.pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(RequestError, match=rf"tensor-parallel rank 1 \(pid {rank.pid}\) was killed by SIGKILL"):
            for _ in stream:
                pass
        assert time.monotonic() - killed < 5
    finally:
        engine.shutdown()


def rank_pids(worker_pid: int) -> list[int]:
    """The tensor-parallel rank processes the worker started (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == worker_pid and b"radixrt.runner.rank_process" in command:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_server_restarts_the_group_when_a_rank_dies(checkpoints):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with running_server(*TINY_ARGS, "--tp", str(TP), model=checkpoints["kv-split-untied"]) as server:
        worker = server.get("/get_server_info").json()["worker_pid"]
        [rank] = rank_pids(worker)
        lines = []
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers, timeout=30) as r:
            for line in r.iter_lines():
                lines.append(line)
                if len(lines) == 3:
                    os.kill(rank, signal.SIGKILL)
                    killed = time.monotonic()
        assert time.monotonic() - killed < 10
        assert any("worker process died" in line for line in lines[3:])
        wait_healthy(server.url, timeout=60)
        r = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True})
        assert r.json()["usage"]["completion_tokens"] == 3
        info = server.get("/get_server_info").json()
        assert info["worker_restarts"] == 1 and info["worker_pid"] != worker
        [new_rank] = rank_pids(info["worker_pid"])
    deadline = time.monotonic() + 10
    while alive(new_rank) and time.monotonic() < deadline:  # the server's shutdown takes its ranks along
        time.sleep(0.1)
    assert not alive(new_rank)
