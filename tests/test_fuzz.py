"""Fuzzing the readers of untrusted bytes: checkpoint files (safetensors, torch pickles, shard
indexes) and the state's own state.json. Any input must either load or raise a FoldinError (one
clear sentence); never another exception, never code execution, never an unbounded allocation.

Brief in CI; longer on demand:  FOLDIN_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from foldin import MergeState
from foldin.errors import FoldinError
from foldin.io.checkpoint import open_checkpoint

EXAMPLES = int(os.environ.get("FOLDIN_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def load_everything(path: Path) -> None:
    """Open a checkpoint and read every tensor: what foldin does with a checkpoint."""
    with open_checkpoint(path) as ckpt:
        for name in ckpt.names():
            ckpt.spec(name)
            ckpt.read(name)


def must_load_or_refuse(path: Path) -> None:
    try:
        load_everything(path)
    except FoldinError as e:
        assert str(e) and "\n" not in str(e)


def _valid_safetensors(path: Path) -> bytes:
    save_file(
        {
            "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.ones(4, dtype=torch.float16),
            "c": torch.tensor([1, 2], dtype=torch.int64),
        },
        path,
    )
    return path.read_bytes()


mutations = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(flips=mutations, cut=st.one_of(st.none(), st.integers(0, 400)))
def test_mutated_safetensors_files(tmp_path_factory, flips, cut):
    d = tmp_path_factory.mktemp("st")
    data = bytearray(_valid_safetensors(d / "ok.safetensors"))
    for pos, value in flips:
        data[pos % len(data)] = value
    (d / "x.safetensors").write_bytes(bytes(data[:cut] if cut is not None else data))
    must_load_or_refuse(d / "x.safetensors")


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=8)
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "Q4"]), json_scalars),
        "shape": st.one_of(st.lists(st.integers(-3, 2**40), max_size=4), json_scalars),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 64), min_size=0, max_size=3), json_scalars),
    }
)


@FUZZ
@given(
    header=st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(entries, json_scalars), max_size=4),
    payload=st.binary(max_size=64),
)
def test_random_safetensors_headers(tmp_path_factory, header, payload):
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("hdr") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    must_load_or_refuse(path)


@FUZZ
@given(flips=mutations)
def test_mutated_torch_pickles(tmp_path_factory, flips):
    d = tmp_path_factory.mktemp("pt")
    torch.save({"w": torch.arange(8, dtype=torch.float32), "n": torch.tensor(3)}, d / "ok.pt")
    data = bytearray((d / "ok.pt").read_bytes())
    for pos, value in flips:
        data[pos % len(data)] = value
    (d / "x.pt").write_bytes(bytes(data))
    must_load_or_refuse(d / "x.pt")


@FUZZ
@given(weight_map=st.one_of(st.dictionaries(st.text(max_size=6), st.text(max_size=24), max_size=4), json_scalars))
def test_random_shard_indexes(tmp_path_factory, weight_map):
    d = tmp_path_factory.mktemp("idx")
    save_file({"a": torch.zeros(2)}, d / "shard-1.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    must_load_or_refuse(d)


_STATE_TEMPLATE: dict[str, Path] = {}


def _state_template(root: Path) -> Path:
    """One real state (tiny BERT, two opcm steps), built once and copied for each example."""
    if "dir" not in _STATE_TEMPLATE:
        from conftest import PARITY

        tmpl = root / "template"
        state = MergeState.create(tmpl, PARITY / "bert-tiny" / "base", "opcm")
        for i in (1, 2):
            state.add(PARITY / "bert-tiny" / f"ckpt_{i}", progress=False)
        _STATE_TEMPLATE["dir"] = tmpl
    return _STATE_TEMPLATE["dir"]


@FUZZ
@given(
    flips=mutations,
    key=st.sampled_from(
        ["step", "generation", "stats", "params", "method", "history", "checksums", "base", "linear_weights"]
    ),
    value=json_scalars,
    mode=st.sampled_from(["bytes", "value", "value-resealed"]),
)
def test_mutated_state_json(tmp_path_factory, flips, key, value, mode):
    """A damaged state.json (flipped bytes, or a field replaced, with or without a recomputed seal
    as an attacker or a buggy tool might do) is refused with a clear error or still reads correctly."""
    from foldin.state.schema import meta_digest as _meta_digest

    root = tmp_path_factory.mktemp("state")
    state_dir = root / "s"
    shutil.copytree(_state_template(tmp_path_factory.getbasetemp()), state_dir)
    path = state_dir / "state.json"
    if mode == "bytes":
        data = bytearray(path.read_bytes())
        for pos, v in flips:
            data[pos % len(data)] = v
        path.write_bytes(bytes(data))
    else:
        meta = json.loads(path.read_text())
        meta[key] = value
        if mode == "value-resealed":
            meta["meta_sha256"] = _meta_digest(meta)
        path.write_text(json.dumps(meta))
    try:
        state = MergeState.open(state_dir)
        state.info()
        state.verify()
        state.merged_state_dict()
    except FoldinError as e:
        assert str(e) and "\n" not in str(e)
