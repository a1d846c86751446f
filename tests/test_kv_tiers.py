"""The disk tier end to end, on tiny random-weight models: a prefix served from memory, from disk or
recomputed gives the same greedy tokens; a restarted engine or server finds its prefixes on disk;
a corrupt or truncated page file, a garbled index, another model or another salt never load
anything they should not; pins survive memory pressure and show in the server's stats and metrics."""

from __future__ import annotations

import os
import re
import shutil
import time

import msgspec
import pytest
from conftest import make_tiny_checkpoint
from server_process import TINY_ARGS, running_server

from radixrt import Engine
from radixrt.cache.base import chain_hashes
from radixrt.cache.disk_tier import IndexFile

PS = 4
PROMPT = list(range(3, 203))  # 200 tokens: 50 pages
FILLERS = [[(i * 7 + j) % 300 + 3 for j in range(200)] for i in range(1, 6)]  # evict PROMPT from memory
GREEDY = {"max_new_tokens": 8, "temperature": 0}
SMALL = dict(page_size=PS, max_total_tokens=256, chunked_prefill_size=64, num_threads=1, kv_disk_gb=0.01)


def tier_dir(root) -> str:
    """The one tier folder (per model identity) under a --kv-disk-dir."""
    (folder,) = [p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p))]
    return os.path.join(root, folder)


def slot_of(root, ids: list[int], page: int, salt: str | None = None) -> tuple[int, int]:
    """(slot, slot_bytes) of page `page` of ids, from the saved index."""
    saved = msgspec.msgpack.decode(open(os.path.join(tier_dir(root), "index.msgpack"), "rb").read(), type=IndexFile)
    slots = {row[0]: row[2] for row in saved.rows}
    return slots[chain_hashes(ids, PS, salt)[page]], saved.slot_bytes


def run(engine: Engine, ids: list[int], **params):
    return engine.generate(input_ids=ids, sampling_params={**GREEDY, **params})


@pytest.fixture(scope="module")
def reference(tiny_llama) -> list[int]:
    with Engine(str(tiny_llama), disable_radix_cache=True, **SMALL) as engine:
        return run(engine, PROMPT).token_ids


def test_same_greedy_tokens_from_memory_disk_and_recompute(tiny_llama, tmp_path, reference):
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        cold = run(engine, PROMPT)
        warm = run(engine, PROMPT)  # from memory
        for ids in FILLERS:
            run(engine, ids)
        assert engine.stats().disk_hit_tokens == 0
        from_disk = run(engine, PROMPT)
        stats = engine.stats()
    assert cold.usage.cached_tokens == 0 and warm.usage.cached_tokens == 196
    assert from_disk.usage.cached_tokens == 196 and stats.disk_hit_tokens > 0
    assert cold.token_ids == warm.token_ids == from_disk.token_ids == reference
    assert stats.used_pages == 0 and stats.protected_pages == 0  # loads released their locks


def test_restarted_engine_loads_from_disk(tiny_llama, tmp_path, reference):
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        run(engine, PROMPT)
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        again = run(engine, PROMPT)
        assert engine.stats().disk_hit_tokens == 196
    assert again.usage.cached_tokens == 196 and again.token_ids == reference


def test_one_process_per_tier(tiny_llama, tmp_path):
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL):
        with pytest.raises(RuntimeError, match="in use"):
            Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL)


def test_corrupt_page_is_skipped_never_loaded(tiny_llama, tmp_path, reference):
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        run(engine, PROMPT)
    slot, slot_bytes = slot_of(tmp_path, PROMPT, 20)
    with open(os.path.join(tier_dir(tmp_path), "pages.bin"), "r+b") as f:
        f.seek(slot * slot_bytes + 100)
        f.write(b"\xff" * 8)
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        out = run(engine, PROMPT)
        stats = engine.stats()
    assert out.usage.cached_tokens == 20 * PS  # the pages before the corrupt one
    assert stats.disk_corrupt_pages == 1 and out.token_ids == reference


def test_truncated_page_file_and_garbled_index(tiny_llama, tmp_path, reference):
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        run(engine, PROMPT)
    slot, slot_bytes = slot_of(tmp_path, PROMPT, 30)
    os.truncate(os.path.join(tier_dir(tmp_path), "pages.bin"), slot * slot_bytes + slot_bytes // 2)
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        out = run(engine, PROMPT)
    assert out.usage.cached_tokens == 30 * PS and out.token_ids == reference
    with open(os.path.join(tier_dir(tmp_path), "index.msgpack"), "r+b") as f:
        f.truncate(40)
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        out = run(engine, PROMPT)
    assert out.usage.cached_tokens == 0 and out.token_ids == reference


def test_another_model_or_layout_never_reads_these_pages(tiny_llama, tmp_path, tmp_path_factory):
    other = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama-other"), "llama", seed=1)  # same layout
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        run(engine, PROMPT)
    mine = tier_dir(tmp_path)
    with Engine(str(other), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        assert run(engine, PROMPT).usage.cached_tokens == 0
    theirs = [p for p in os.listdir(tmp_path) if os.path.join(tmp_path, p) != mine and os.path.isdir(tmp_path / p)]
    assert len(theirs) == 1  # a tier of its own
    shutil.rmtree(tmp_path / theirs[0])
    shutil.copytree(mine, tmp_path / theirs[0])  # the first model's files under the other's name
    with Engine(str(other), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        assert run(engine, PROMPT).usage.cached_tokens == 0  # the stored identity does not match
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **dict(SMALL, page_size=8)) as engine:
        assert run(engine, PROMPT).usage.cached_tokens == 0  # another page size is another layout


def test_salts_stay_apart_on_disk_and_are_not_stored(tiny_llama, tmp_path):
    salt = "tenant-secret-7f3a"
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        run(engine, PROMPT, cache_salt=salt)
    with Engine(str(tiny_llama), kv_disk_dir=str(tmp_path), **SMALL) as engine:
        assert run(engine, PROMPT, cache_salt="someone-else").usage.cached_tokens == 0
        assert run(engine, PROMPT).usage.cached_tokens == 0
        assert run(engine, PROMPT, cache_salt=salt).usage.cached_tokens == 196
    for name in os.listdir(tier_dir(tmp_path)):
        assert salt.encode() not in open(os.path.join(tier_dir(tmp_path), name), "rb").read()


def test_server_restart_pins_and_metrics(tiny_llama, tmp_path):
    args = (*TINY_ARGS, "--max-total-tokens", "512", "--max-context-len", "256", "--max-pinned-tokens", "128",
            "--kv-disk-dir", str(tmp_path), "--kv-disk-gb", "0.01")  # fmt: skip
    body = {"input_ids": PROMPT, "sampling_params": GREEDY}
    with running_server(*args, model=tiny_llama) as server:
        first = server.post("/generate", body).json()
        pin = server.post("/pin_prefix", {"input_ids": PROMPT[:64], "cache_salt": "s"})
        assert pin.status_code == 200 and pin.json()["pinned_tokens"] == 64, pin.text
        for ids in FILLERS:  # memory pressure: the pinned pages stay
            server.post("/generate", {"input_ids": ids, "sampling_params": GREEDY})
        info = server.get("/get_server_info").json()
        assert info["stats"]["num_pins"] == 1 and info["stats"]["pinned_pages"] == 64 // PS
        assert info["config"]["kv_disk_dir"] == str(tmp_path)
        metrics = server.get("/metrics").text
        assert re.search(r"^radixrt_pinned_tokens\{[^}]*\} 64\.0$", metrics, re.M), metrics
        assert re.search(r'^radixrt_kv_disk_pages\{[^}]*state="ready"\}', metrics, re.M), metrics
        bad = server.post("/pin_prefix", {"input_ids": PROMPT[:64], "cache_salt": ""})
        assert 400 <= bad.status_code < 500 and "cache_salt" in bad.text, bad.text
        over = server.post("/pin_prefix", {"input_ids": FILLERS[0]})  # 64 + 200 tokens > 128
        assert over.status_code == 409 and "cap" in over.json()["error"]["message"]
        assert server.post("/unpin_prefix", {"input_ids": PROMPT[:64], "cache_salt": "s"}).json()["unpinned"]
        assert server.post("/unpin_prefix", {"input_ids": PROMPT[:64], "cache_salt": "s"}).status_code == 404
        deadline = time.monotonic() + 20
        while server.stats()["disk_pending_io"] and time.monotonic() < deadline:
            time.sleep(0.1)
    with running_server(*args, model=tiny_llama) as server:
        again = server.post("/generate", body).json()
    assert again["meta_info"]["cached_tokens"] == 196 and again["output_ids"] == first["output_ids"]
