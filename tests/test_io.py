"""Checkpoint readers and the streaming safetensors writer, on real files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from foldin.errors import CheckpointError
from foldin.io.checkpoint import content_hash, open_checkpoint, tensor_digest
from foldin.io.export import parse_size, plan_shards
from foldin.io.safetensors_file import DTYPES, SafetensorsWriter

SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@settings(max_examples=40, deadline=None)
@given(
    tensors=st.dictionaries(
        st.text("abcxyz._", min_size=1, max_size=8), st.tuples(st.sampled_from(sorted(DTYPES)), SHAPES), max_size=6
    ),
    seed=st.integers(0, 1000),
)
def test_writer_round_trips_every_dtype_through_safetensors_and_our_reader(tmp_path_factory, tensors, seed):
    gen = torch.Generator().manual_seed(seed)
    sd = {n: (torch.randn(shape, generator=gen) * 100).to(DTYPES[d]) for n, (d, shape) in tensors.items()}
    path = tmp_path_factory.mktemp("rt") / "x.safetensors"
    with SafetensorsWriter(path, {n: (t.dtype, tuple(t.shape)) for n, t in sd.items()}) as w:
        for n in reversed(list(sd)):  # any write order
            w.write(n, sd[n])
    reference = load_file(path)  # the official library reads what we wrote
    with open_checkpoint(path) as ck:
        assert sorted(ck.names()) == sorted(sd)
        for n, t in sd.items():
            assert reference[n].dtype == t.dtype and reference[n].shape == t.shape
            assert tensor_digest(reference[n]) == tensor_digest(ck.read(n)) == tensor_digest(t)  # bitwise


def test_a_write_that_fails_in_the_background_is_raised_and_the_file_closed(tmp_path, monkeypatch):
    """Tensors are written on a background thread: a failed pwrite must still reach the caller
    (at a later write or at close), and the file descriptor must not leak."""
    import errno
    import os

    import foldin.io.safetensors_file as stf

    sd = {f"t{i}": torch.full((256,), float(i)) for i in range(6)}
    real_pwrite, calls = os.pwrite, {"n": 0}

    def pwrite_once_then_full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 2:  # the header, then one tensor
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(stf.os, "pwrite", pwrite_once_then_full)
    writer = SafetensorsWriter(tmp_path / "x.safetensors", {n: (t.dtype, tuple(t.shape)) for n, t in sd.items()})
    fd = writer._fd
    with pytest.raises(OSError, match="No space left"):
        for n, t in sd.items():
            writer.write(n, t)
        writer.close()
    writer.abort()  # what the caller's cleanup (the context manager's exit) does after the error
    with pytest.raises(OSError):  # the descriptor is closed, writes in flight or not
        os.fstat(fd)


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "l1.weight": torch.randn(4, 3, generator=g),
        "l1.bias": torch.randn(4, generator=g),
        "step": torch.tensor([7]),
    }


def _hash(path: Path) -> str:
    with open_checkpoint(path) as ck:
        return content_hash({n: (*ck.spec(n), tensor_digest(ck.read(n))) for n in ck.names()})


def test_every_format_gives_the_same_tensors_and_hash(tmp_path):
    sd = _sd()
    save_file(sd, tmp_path / "single.safetensors")
    torch.save(sd, tmp_path / "sd.pt")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    shard = tmp_path / "sharded"
    shard.mkdir()
    save_file({"l1.weight": sd["l1.weight"]}, shard / "model-00001-of-00002.safetensors")
    save_file({"l1.bias": sd["l1.bias"], "step": sd["step"]}, shard / "model-00002-of-00002.safetensors")
    (shard / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "l1.weight": "model-00001-of-00002.safetensors",
                    "l1.bias": "model-00002-of-00002.safetensors",
                    "step": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    hf_bin = tmp_path / "hfbin"
    hf_bin.mkdir()
    torch.save(sd, hf_bin / "pytorch_model.bin")
    hashes = {
        _hash(p) for p in [tmp_path / "single.safetensors", tmp_path / "sd.pt", tmp_path / "legacy.bin", shard, hf_bin]
    }
    assert len(hashes) == 1


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _hf_folder_with_config(p: Path, config: bytes) -> Path:
    (p / "m").mkdir()
    save_file({"w": torch.zeros(2)}, p / "m" / "model.safetensors")
    _write(p / "m" / "config.json", config)
    return p / "m"


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: torch.save({"w": torch.zeros(2), "x": Evil()}, p / "evil.pt") or p / "evil.pt",
            "weights_only=True",
        ),
        (lambda p: _write(p / "x.safetensors", struct.pack("<Q", 10**6) + b"{}"), "truncated"),
        (lambda p: _write(p / "x.safetensors", struct.pack("<Q", 4) + b"{{{{"), "not valid JSON"),
        (lambda p: _write(p / "x.pt", b"PK\x03\x04garbage"), "truncated or corrupted"),
        (lambda p: _write(p / "x.safetensors", b"abc"), "shorter than 8 bytes"),
        (lambda p: p / "missing.safetensors", "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "holds no model weights"),
        (lambda p: _hf_folder_with_config(p, b"{'model_type': bert,"), "not valid JSON"),
        (lambda p: _hf_folder_with_config(p, b"[1, 2]"), "not valid JSON"),
    ],
)
def test_bad_files_give_one_clear_sentence(tmp_path, make, message, capsys):
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(make(tmp_path))
    assert "this must never run" not in capsys.readouterr().out


def _raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlapping",
        ),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12"),
        ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [2**41, 2**41], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "invalid data offsets"),
    ],
)
def test_lying_safetensors_headers_are_refused(tmp_path, header, data, message):
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(_raw_safetensors(tmp_path / "x.safetensors", header, data))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "link.safetensors"])
def test_index_may_not_point_outside_the_checkpoint_folder(tmp_path, target):
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file(_sd(), tmp_path / "outside.safetensors")
    (folder / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"l1.weight": target}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        open_checkpoint(folder)


def test_duplicate_tensor_across_shards_is_refused(tmp_path):
    for i in (1, 2):
        save_file({"w": torch.zeros(2)}, tmp_path / f"s{i}.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "s1.safetensors", "v": "s2.safetensors"}})
    )
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path)


def test_sizes_and_shard_plans():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    assert plan_shards({"a": 6, "b": 6, "c": 20, "d": 1}, 10) == [["a"], ["b"], ["c"], ["d"]]
    assert plan_shards({"a": 3, "b": 3, "c": 3}, 10) == [["a", "b", "c"]]


LORA = Path(__file__).parent / "fixtures" / "lora"


@pytest.mark.parametrize("i", [1, 2])
def test_lora_adapters_give_exactly_what_peft_merge_and_unload_gives(i):
    """Adapters written by PEFT itself (plain LoRA on query/value; rsLoRA on every dense layer)."""
    from foldin.io.lora import open_model_or_adapter

    with (
        open_checkpoint(LORA.parent / "parity" / "bert-tiny" / "base") as base,
        open_model_or_adapter(LORA / f"adapter_{i}", base) as ckpt,
    ):
        ours = {n: ckpt.read(n) for n in ckpt.names()}
    peft = load_file(LORA / f"merged_{i}" / "model.safetensors")
    assert set(peft) <= set(ours)
    for name, t in peft.items():
        assert torch.allclose(ours[name], t, rtol=0, atol=1e-6), name
    assert (
        sum(
            not torch.equal(ours[n], t)
            for n, t in load_file(LORA.parent / "parity" / "bert-tiny" / "base" / "model.safetensors").items()
        )
        > 0
    )


def test_lora_adapters_fold_in_like_the_dense_models_they_stand_for(tmp_path):
    from foldin import MergeState

    base = LORA.parent / "parity" / "bert-tiny" / "base"
    a = MergeState.create(tmp_path / "adapters", base, "opcm")
    b = MergeState.create(tmp_path / "dense", base, "opcm")
    for i in (1, 2):
        a.add(LORA / f"adapter_{i}", progress=False)
        b.add(LORA / f"merged_{i}", progress=False)
    assert [e["hash"] for e in a.history] == [e["hash"] for e in b.history]  # same content, same hash
    ma, mb = a.merged_state_dict(), b.merged_state_dict()
    assert all(torch.allclose(ma[k], mb[k], atol=1e-6) for k in mb)


def test_lora_adapters_fold_with_opcm_over_nonzero_pairs_as_the_float64_reference(tmp_path):
    """OPCM with diagonal=nonzero on PEFT adapters: the merged task vector after step 1 is the first
    adapter's low-rank update; step 2 is checked against the full-SVD float64 reference."""
    from foldin import MergeState
    from test_methods import reference_projection

    base_dir = LORA.parent / "parity" / "bert-tiny" / "base"
    state = MergeState.create(tmp_path / "state", base_dir, "opcm", {"diagonal": "nonzero"})
    for i in (1, 2):
        state.add(LORA / f"adapter_{i}", progress=False)
    base = {n: t.double() for n, t in load_file(base_dir / "model.safetensors").items()}
    taus = [
        {n: t.double() - base[n] for n, t in load_file(LORA / f"merged_{i}" / "model.safetensors").items()}
        for i in (1, 2)
    ]
    linear = set(state.meta["linear_weights"])
    merged = {
        n: taus[0][n]
        + (
            reference_projection(taus[0][n], taus[1][n], 0.5, nonzero=True)
            if n in linear and taus[0][n].any()
            else taus[1][n]
        )
        for n in taus[0]
    }
    norm = lambda tv: math.sqrt(sum(float(t.square().sum()) for t in tv.values()))
    scale = (norm(taus[0]) + norm(taus[1])) / 2 / norm(merged)
    ours = state.merged_state_dict()
    for n, tv in merged.items():
        torch.testing.assert_close(ours[n].double(), base[n] + scale * tv, rtol=1e-5, atol=1e-6)


def test_unsupported_adapters_are_refused(tmp_path):
    import shutil

    from foldin.io.lora import open_model_or_adapter

    bad = tmp_path / "dora"
    shutil.copytree(LORA / "adapter_1", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with open_checkpoint(LORA.parent / "parity" / "bert-tiny" / "base") as base:
        with pytest.raises(CheckpointError, match="DoRA"):
            open_model_or_adapter(bad, base)
