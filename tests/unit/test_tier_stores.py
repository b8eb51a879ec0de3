"""Tier building blocks without a model: the block codec rejects every kind of damage and still reads values
written before it moved to bytes, the torch BlockIO round-trips blocks bit for bit, the host tier stays within
its byte budget in LRU order, disk and Redis stores return the longest present run of keys, the model
fingerprint in the keys covers every weight value, and the tier manager runs on a BlockIO without torch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvserve.kv.tiers import BlockIO, BlockLayout, DiskStore, HostTier, RedisStore, open_store
from kvserve.kv.tiers.codec import CorruptEntry, decode_block, encode_block
from kvserve.kv.tiers.stores import HostEntry
from kvserve.model.block_io import TorchBlockIO
from kvserve.model.fingerprint import model_fingerprint

SHAPE = (2, 2, 1, 4, 8)  # layers, K/V, kv_heads, block_size, head_dim (one block)
TOKENS = [5, 6, 7, 8]
F32 = BlockLayout("float32", SHAPE, 4)


def _encode(kv: torch.Tensor) -> bytes:
    return encode_block(TOKENS, kv.contiguous().view(torch.uint8).numpy().tobytes(), F32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_codec_round_trip_through_the_torch_block_io_is_bit_exact(dtype):
    """A pool block read out, encoded, decoded and written into another block is the same bits."""
    cache = torch.randn(2, 2, 1, 3, 4, 8).to(dtype)  # (layers, 2, kv_heads, blocks, block_size, head_dim)
    io = TorchBlockIO(cache)
    assert io.layout == BlockLayout(str(dtype).removeprefix("torch."), SHAPE, cache.element_size())
    (payload,) = io.read([1])
    value = encode_block(TOKENS, io.to_bytes(payload), io.layout)
    io.write([2], [io.from_bytes(decode_block(value, TOKENS, io.layout))])
    assert torch.equal(cache[:, :, :, 2].view(torch.uint8), cache[:, :, :, 1].view(torch.uint8))
    assert io.nbytes(payload) == io.layout.nbytes
    cache[:, :, :, 1] += 1  # payloads own their memory
    assert torch.equal(payload.view(torch.uint8), cache[:, :, :, 2].view(torch.uint8))
    many = io.read([2, 0])  # one gather for several blocks
    assert torch.equal(many[0], cache[:, :, :, 2]) and torch.equal(many[1], cache[:, :, :, 0])


def test_codec_reads_values_written_before_the_block_io():
    """The on-disk format is unchanged: a value the torch-based codec wrote (bfloat16, tokens 3 1 4 1,
    KV = arange(16) / 4) still decodes to the same bytes."""
    old = bytes.fromhex(
        "4b56534202000000c0140b957005e399065cfe5f51a205f02f0000007b226474797065223a202262666c6f61743136222c"
        "20227368617065223a205b312c20322c20312c20322c20345d7d0400000003000000010000000400000001000000000080"
        "3e003f403f803fa03fc03fe03f00401040204030404040504060407040"
    )
    layout = BlockLayout("bfloat16", (1, 2, 1, 2, 4), 2)
    kv = (torch.arange(16, dtype=torch.float32).reshape(layout.shape) / 4).to(torch.bfloat16)
    raw = bytes(decode_block(old, [3, 1, 4, 1], layout))
    assert raw == kv.view(torch.uint8).numpy().tobytes()
    assert encode_block([3, 1, 4, 1], raw, layout) == old


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_codec_rejects_any_flipped_byte_or_truncation(data):
    value = bytearray(_encode(torch.randn(SHAPE)))
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, 63) | st.integers(0, len(value) - 1))  # the header often
        value[i] ^= data.draw(st.integers(1, 255))
    else:
        value = value[: data.draw(st.integers(0, len(value) - 1))]
    with pytest.raises(CorruptEntry):
        decode_block(bytes(value), TOKENS, F32)


def test_codec_rejects_other_tokens_dtype_or_shape():
    value = _encode(torch.randn(SHAPE))
    with pytest.raises(CorruptEntry, match="token ids differ"):
        decode_block(value, [5, 6, 7, 9], F32)
    with pytest.raises(CorruptEntry, match="layout"):
        decode_block(value, TOKENS, BlockLayout("bfloat16", SHAPE, 2))
    with pytest.raises(CorruptEntry, match="layout"):
        decode_block(value, TOKENS, BlockLayout("float32", (2, 2, 4, 2, 4), 4))
    with pytest.raises(ValueError, match="payload has"):
        encode_block(TOKENS, b"short", F32)


def test_host_tier_is_byte_bounded_and_lru():
    one = torch.zeros(SHAPE).nbytes
    tier = HostTier(3 * one)
    entries = {k: HostEntry(tuple(TOKENS), torch.full(SHAPE, float(k)), one) for k in range(5)}
    for k in range(3):
        tier.put(bytes([k]), entries[k])
    assert tier.get(bytes([0])) is entries[0]  # 0 becomes most recent
    tier.put(bytes([3]), entries[3])  # evicts 1, the least recent
    assert bytes([1]) not in tier and bytes([0]) in tier and tier.bytes_held == 3 * one
    assert tier.num_evictions == 1
    assert not HostTier(one - 1).put(b"x", entries[4])  # larger than the whole tier: refused, nothing lost


def _store_contract(store):
    keys = [f"k{i}" for i in range(5)]
    for k in keys[:3]:
        store.put(k, k.encode() * 3)
    store.put("k4", b"after a gap")
    assert store.get_prefix(keys) == [b"k0k0k0", b"k1k1k1", b"k2k2k2"]  # stops at the first missing key
    store.delete("k0")
    assert store.get_prefix(keys) == []
    assert store.get_prefix([]) == []


def test_disk_store_contract_and_no_temp_files(tmp_path):
    store = DiskStore(tmp_path)
    _store_contract(store)
    assert not list(tmp_path.rglob(".tmp-*"))


def test_redis_store_contract_and_batched_lookup(redis_server):
    store = RedisStore(redis_server.url)
    _store_contract(store)
    keys = [f"b{i}" for i in range(150)]
    for k in keys[:130]:
        store.put(k, k.encode())
    assert store.get_prefix(keys, batch=64) == [k.encode() for k in keys[:130]]
    store.close()


def test_open_store_specs(tmp_path):
    assert isinstance(open_store(f"disk:{tmp_path}/s"), DiskStore)
    bare = open_store(str(tmp_path / "bare"))  # a bare path is the disk store too
    assert isinstance(bare, DiskStore) and bare.root == tmp_path / "bare"
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)  # connects lazily
    with pytest.raises(ValueError, match="disk:PATH or redis://"):
        open_store("ftp://x")
    with pytest.raises(ValueError, match="needs a directory"):
        open_store("disk:")


def test_disk_store_spreads_keys_over_directories(tmp_path):
    store = DiskStore(tmp_path)
    keys = [f"kvserve-v2-ns-{i:064x}" for i in range(0, 4096, 97)]
    for k in keys:
        store.put(k, b"v")
    dirs = {p.parent.name for p in tmp_path.rglob("kvserve-*")}
    assert dirs == {k[-2:] for k in keys} and len(dirs) > 30  # by the hash's last digits, not the shared prefix
    assert store.get_prefix(keys) == [b"v"] * len(keys)


def test_model_fingerprint_covers_every_weight_value():
    """Weights that differ anywhere (here past the first 256 values of one tensor) get different store keys;
    the same values stored in another dtype (a GGUF vs a safetensors copy) get the same."""

    @dataclass
    class Cfg:
        hidden_size: int = 8

    base = torch.randn(64, 64).to(torch.bfloat16)
    weights = {"a.weight": base, "b.weight": torch.ones(10)}
    changed = base.clone()
    changed[63, 63] += 1
    fp = model_fingerprint(Cfg(), weights)
    assert model_fingerprint(Cfg(), {**weights, "a.weight": changed}) != fp
    assert model_fingerprint(Cfg(), {**weights, "a.weight": base.float()}) == fp
    assert model_fingerprint(Cfg(hidden_size=9), weights) != fp


def test_entries_found_missing_or_corrupt_are_written_again(tmp_path):
    """The write-through memo ("already in the store") is dropped for a block a lookup finds missing or
    corrupt, and for the rest of its chain, so recomputing the block writes it again."""
    from types import SimpleNamespace

    from kvserve.kv.hashing import hash_block_chain
    from kvserve.kv.tiers import TieredCache

    bs, layers, heads, hd = 4, 2, 1, 8
    kv_cache = torch.randn(layers, 2, heads, 4, bs, hd)
    tokens = list(range(1, 3 * bs + 1))
    hashes = hash_block_chain(tokens, bs)
    blocks = [SimpleNamespace(block_id=i, block_hash=h, token_ids=tuple(tokens[i * bs : (i + 1) * bs]))
              for i, h in enumerate(hashes)]  # fmt: skip
    tiers = TieredCache(TorchBlockIO(kv_cache), "ns", 0, DiskStore(tmp_path))

    def publish_all() -> None:
        tiers.on_cached(blocks)
        assert tiers.flush(10)

    def found() -> int:
        return len(tiers.lookup(hashes, tokens, bs, 0, len(hashes)))

    publish_all()
    assert found() == 3
    path = tiers.store._path(tiers.key(hashes[1]))
    path.write_bytes(path.read_bytes()[:-5])  # block 1 torn
    assert found() == 1 and tiers.stats["disk"].corrupt == 1
    publish_all()  # the engine recomputed blocks 1-2 and publishes them again
    assert found() == 3
    tiers.store._path(tiers.key(hashes[2])).unlink()  # lost (cleaned up, or evicted by the store itself)
    assert found() == 2
    publish_all()
    assert found() == 3
    stores = tiers.stats["disk"].stores
    publish_all()  # all known to be there: no redundant writes
    assert tiers.stats["disk"].stores == stores
    tiers.close()


def test_write_through_pauses_while_the_store_fails(tmp_path):
    """After a failed write (here the shard directory's name is taken by a file) the store is not writable for
    its back-off, and write-through copies nothing meanwhile; the blocks stay unknown, so they are written
    once it is writable again."""
    from types import SimpleNamespace

    from kvserve.kv.hashing import hash_block_chain
    from kvserve.kv.tiers import TieredCache
    from kvserve.kv.tiers.stores import StoreUnavailable

    store = DiskStore(tmp_path, retry_after_s=60)
    tiers = TieredCache(TorchBlockIO(torch.randn(1, 2, 1, 2, 4, 8)), "ns", 0, store)
    (h,) = hash_block_chain([1, 2, 3, 4], 4)
    block = SimpleNamespace(block_id=0, block_hash=h, token_ids=(1, 2, 3, 4))
    shard = tmp_path / tiers.key(h)[-2:]
    shard.write_text("a file where the shard directory goes")
    with pytest.raises(StoreUnavailable):
        store.put(tiers.key(h), b"v")
    assert not store.writable()
    tiers.on_cached([block])
    assert tiers._writes.unfinished_tasks == 0 and h not in tiers._known
    shard.unlink()
    store._write_down_until = 0.0  # the back-off has passed
    tiers.on_cached([block])
    assert tiers.flush(10) and tiers.stats["disk"].stores == 1
    assert len(tiers.lookup([h], [1, 2, 3, 4], 4, 0, 1)) == 1
    tiers.close()


def test_bounded_disk_store_evicts_least_recently_used_files(tmp_path):
    """max_bytes bounds the files: least recently used out (a read refreshes), the bound holds across a
    restart (the index is rebuilt from the files' times), counted evictions."""
    import os

    value = b"x" * 1000
    store = DiskStore(tmp_path, max_bytes=3500)
    for i in range(3):
        store.put(f"kvserve-k{i}", value)
        os.utime(store._path(f"kvserve-k{i}"), (1000 + i, 1000 + i))  # distinct times for the restart below
    assert store.get_prefix(["kvserve-k0"]) == [value]  # k0 is now the most recently used
    store.put("kvserve-k3", value)
    on_disk = sorted(p.name for p in tmp_path.rglob("kvserve-*"))
    assert on_disk == ["kvserve-k0", "kvserve-k2", "kvserve-k3"] and store.num_evictions == 1
    assert store.bytes_held == 3000 == sum(p.stat().st_size for p in tmp_path.rglob("kvserve-*"))
    store.delete("kvserve-k3")
    assert store.bytes_held == 2000
    # A restart with a smaller bound keeps the most recently used files only.
    os.utime(store._path("kvserve-k0"), (2000, 2000))
    smaller = DiskStore(tmp_path, max_bytes=1500)
    assert [p.name for p in tmp_path.rglob("kvserve-*")] == ["kvserve-k0"] and smaller.num_evictions == 1
    with pytest.raises(ValueError, match="byte bound"):
        DiskStore(tmp_path, max_bytes=0)
    with pytest.raises(ValueError, match="maxmemory"):
        open_store("redis://127.0.0.1:1/0", max_bytes=10)


class BytesBlockIO(BlockIO):
    """A pool of plain bytes objects: the BlockIO contract with no tensor library at all."""

    def __init__(self, num_blocks: int, block_bytes: int):
        self.blocks = [bytes([i]) * block_bytes for i in range(num_blocks)]
        self._layout = BlockLayout("uint8", (block_bytes,), 1)
        self.reads: list[list[int]] = []

    @property
    def layout(self) -> BlockLayout:
        return self._layout

    def read(self, block_ids):
        self.reads.append(list(block_ids))
        return [self.blocks[b] for b in block_ids]

    def write(self, block_ids, payloads):
        for b, p in zip(block_ids, payloads, strict=True):
            self.blocks[b] = bytes(p)

    def to_bytes(self, payload):
        return payload

    def from_bytes(self, data):
        return bytes(data)

    def nbytes(self, payload):
        return len(payload)


def test_tiered_cache_moves_blocks_only_through_its_block_io(tmp_path):
    """Host tier and disk store on a BlockIO of bytes: evicted and published blocks come back bit for bit,
    published blocks are read in one call, and the host tier's byte budget counts BlockIO.nbytes."""
    from types import SimpleNamespace

    from kvserve.kv.hashing import hash_block_chain
    from kvserve.kv.tiers import TieredCache

    bs = 2
    io = BytesBlockIO(num_blocks=6, block_bytes=16)
    tokens = list(range(1, 3 * bs + 1))
    hashes = hash_block_chain(tokens, bs)
    blocks = [SimpleNamespace(block_id=i, block_hash=h, token_ids=tuple(tokens[i * bs : (i + 1) * bs]))
              for i, h in enumerate(hashes)]  # fmt: skip
    tiers = TieredCache(io, "ns", host_bytes=2 * 16, store=DiskStore(tmp_path))
    tiers.on_cached(blocks)
    assert io.reads == [[0, 1, 2]] and tiers.flush(10)
    for b in blocks:
        tiers.on_evict(b)  # the host tier holds two blocks: block 0 is evicted from it
    assert tiers.host.bytes_held == 32 and tiers.stats["cpu"].evictions == 1
    found = tiers.lookup(hashes, tokens, bs, 0, 3)
    assert [(b.tier, b.index) for b in found] == [("disk", 0), ("disk", 1), ("disk", 2)]  # 0 left the host
    found = tiers.lookup(hashes, tokens, bs, 1, 3)
    assert [(b.tier, b.index) for b in found] == [("cpu", 1), ("cpu", 2)]
    tiers.load_into([4, 5], found)
    assert io.blocks[4] == bytes([1]) * 16 and io.blocks[5] == bytes([2]) * 16
    tiers.close()


def test_byte_lru_contract():
    """Refused when bigger than the capacity (nothing evicted), replaced in place (not an eviction), evicted
    least recently used first with the callback, get/touch refresh and peek does not."""
    from kvserve.kv.lru import ByteLRU

    evicted = []
    lru = ByteLRU(10, on_evict=lambda k, v: evicted.append((k, v)))
    assert lru.put("a", 1, 4) and lru.put("b", 2, 4)
    assert not lru.put("big", 0, 11) and lru.keys() == ["a", "b"]
    assert lru.put("a", 10, 5) and lru.num_evictions == 0 and lru.bytes_held == 9
    assert lru.keys() == ["b", "a"] and lru.peek("b") == 2 and lru.keys() == ["b", "a"]
    assert lru.touch("b") and lru.keys() == ["a", "b"]
    assert lru.put("c", 3, 6)  # a, the least recent, goes: 4 + 6 = 10 fits
    assert evicted == [("a", 10)] and lru.keys() == ["b", "c"] and lru.bytes_held == 10
    assert lru.get("b") == 2 and lru.keys() == ["c", "b"]
    assert lru.pop("c") == 3 and lru.pop("c") is None and lru.num_evictions == 1
    lru.check_invariants()
    assert lru.clear() == 1 and lru.num_evictions == 2 and lru.bytes_held == 0 and len(lru) == 0
    with pytest.raises(ValueError):
        ByteLRU(-1)
