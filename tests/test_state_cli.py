"""The on-disk state through the CLI: the happy path, every refusal (state untouched), locking,
resumable `run`, and atomicity under kill -9."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModel

from conftest import read_weights, snapshot, write_variant
from foldin import FoldinError, MergeState, merge
from foldin.cli import main


def cli(*args: str) -> int:
    return main([*map(str, args)])


def test_init_add_export_info_methods(bert_case, tmp_path, capsys):
    state = tmp_path / "state"
    assert cli("init", state, "--base", bert_case / "base", "--method", "opcm", "--set", "alpha=0.6") == 0
    assert cli("add", state, bert_case / "ckpt_1", bert_case / "ckpt_2", "--quiet") == 0
    assert cli("add", state, bert_case / "ckpt_3", "--quiet") == 0
    assert cli("export", state, tmp_path / "out", "--dtype", "bfloat16", "--max-shard-size", "30KB", "--quiet") == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert (out / "config.json").exists() and "ckpt_3" in (out / "README.md").read_text()
    model = AutoModel.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16

    base = read_weights(bert_case / "base")
    expected = merge(
        base,
        [read_weights(bert_case / f"ckpt_{i}") for i in (1, 2, 3)],
        method="opcm",
        alpha=0.6,
        linear_weights=AutoModel.from_pretrained(bert_case / "base"),
    )
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, expected[name].to(torch.bfloat16))  # CLI == in-memory API

    capsys.readouterr()
    assert cli("info", state, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 3 and info["params"] == {"alpha": 0.6, "diagonal": "all"} and len(info["history"]) == 3
    assert info["linear_weights"] == 13 and "nn.Linear" in info["linear_weights_source"]
    assert cli("methods") == 0
    assert "scaling_factor" in capsys.readouterr().out


def test_state_size_does_not_grow_with_steps(bert_case, tmp_path):
    state = MergeState.create(tmp_path / "s", bert_case / "base", "ties")
    sizes = []
    for i in (1, 2, 3):
        state.add(bert_case / f"ckpt_{i}", progress=False)
        sizes.append(sum(p.stat().st_size for p in (tmp_path / "s").rglob("*.safetensors")))
    assert sizes[0] == sizes[1] == sizes[2]
    assert len(list((tmp_path / "s").glob("gen-*"))) == 1


def _bad_inputs(case: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    ck = case / "ckpt_2"
    nan = lambda sd: {**sd, "pooler.dense.bias": sd["pooler.dense.bias"] * float("nan")}  # noqa: E731
    truncated = write_variant(ck, tmp / "truncated", lambda sd: sd)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(truncated / "model.safetensors") - 100)
    return {
        "missing key": (
            write_variant(ck, tmp / "missing", lambda sd: {k: v for k, v in sd.items() if k != "pooler.dense.bias"}),
            "missing",
        ),
        "extra key": (
            write_variant(ck, tmp / "extra", lambda sd: {**sd, "classifier.weight": torch.zeros(2, 32)}),
            "not in the base",
        ),
        "shape": (write_variant(ck, tmp / "shape", lambda sd: {**sd, "pooler.dense.bias": torch.zeros(33)}), "shape"),
        "dtype": (
            write_variant(ck, tmp / "dtype", lambda sd: {**sd, "pooler.dense.bias": sd["pooler.dense.bias"].double()}),
            "float64",
        ),
        "nan": (write_variant(ck, tmp / "nan", nan), "NaN or Inf"),
        "truncated": (truncated, "truncated"),
        "duplicate": (case / "ckpt_1", "already folded in at step 1"),
        "base itself": (case / "base", "base model itself"),
        "other architecture": (
            PARITY_CLIP,
            "does not have the base model's tensors: 39 of the base's tensors are missing (e.g. "
            "'embeddings.LayerNorm.bias'); 39 are not in the base (e.g. 'vision_model.embeddings.class_embedding'); "
            "it looks like a different model than the base (CLIPVisionModel; the base is BertModel).",
        ),
        "not a checkpoint": (tmp / "nowhere", "does not exist"),
    }


from conftest import PARITY  # noqa: E402

PARITY_CLIP = PARITY / "clip-vision-tiny" / "ckpt_1"


@pytest.mark.parametrize("method", ["opcm", "ties"])
def test_bad_checkpoints_are_refused_and_the_state_is_untouched(bert_case, tmp_path, method, capsys):
    state = tmp_path / "state"
    cli("init", state, "--base", bert_case / "base", "--method", method)
    cli("add", state, bert_case / "ckpt_1", "--quiet")
    before = snapshot(state)
    for label, (path, message) in _bad_inputs(bert_case, tmp_path).items():
        capsys.readouterr()
        assert cli("add", state, path, "--quiet") == 1, label
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (label, err)
        assert snapshot(state) == before, label
    assert cli("add", state, bert_case / "ckpt_2", "--quiet") == 0  # and it still works


def test_changed_base_is_detected(bert_case, tmp_path, capsys):
    state = tmp_path / "state"
    cli("init", state, "--base", bert_case / "base", "--method", "average")
    cli("add", state, bert_case / "ckpt_1", "--quiet")
    before = snapshot(state)
    write_variant(bert_case / "ckpt_3", tmp_path / "other_base", lambda sd: sd)
    os.replace(tmp_path / "other_base" / "model.safetensors", bert_case / "base" / "model.safetensors")
    assert cli("add", state, bert_case / "ckpt_2", "--quiet") == 1
    assert "has changed since this state was created" in capsys.readouterr().err
    assert snapshot(state) == before


def test_run_config_is_resumable_and_refuses_another_base(bert_case, tmp_path, capsys):
    cfg = {
        "base": str(bert_case / "base"),
        "method": "task_arithmetic",
        "params": {"scaling_factor": 0.5},
        "checkpoints": [str(bert_case / "ckpt_1")],
        "output": str(tmp_path / "merged"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli("run", path, "--quiet") == 0
    first = capsys.readouterr().out.splitlines()[0]  # where the state lives, before any work
    assert first == f"keeping the state in {(tmp_path / 'merged.foldin-state').resolve()}"
    cfg["checkpoints"].append(str(bert_case / "ckpt_2"))
    path.write_text(yaml.safe_dump(cfg))
    assert cli("run", path, "--quiet") == 0
    assert "resuming the state in" in capsys.readouterr().out
    assert MergeState.open(tmp_path / "merged.foldin-state").step == 2
    AutoModel.from_pretrained(tmp_path / "merged")
    cfg["base"] = str(bert_case / "ckpt_3")
    path.write_text(yaml.safe_dump(cfg))
    assert cli("run", path, "--quiet") == 1
    assert "is not the base model" in capsys.readouterr().err


def test_the_first_step_hashes_the_base_as_a_full_read_would(bert_case, tmp_path, capsys):
    """`init` and `run` leave the base's hash to the first step, which reads the base anyway (one
    read of the base, not two): the state must record the hash a separate full read gives, and still
    refuse the base as a checkpoint."""
    cli("init", tmp_path / "by-init", "--base", bert_case / "base", "--method", "task_arithmetic")
    assert MergeState.open(tmp_path / "by-init").meta["base"]["hash"] is None
    hashed = MergeState.create(tmp_path / "hashed", bert_case / "base", "task_arithmetic", hash_base=True)
    cfg = {"base": str(bert_case / "base"), "method": "task_arithmetic", "output": str(tmp_path / "out")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**cfg, "checkpoints": [str(bert_case / "base")]}))
    capsys.readouterr()
    assert cli("run", path, "--quiet") == 1
    assert "is the base model itself" in capsys.readouterr().err
    state_dir = tmp_path / "out.foldin-state"
    assert MergeState.open(state_dir).step == 0 and MergeState.open(state_dir).meta["base"]["hash"] is None
    path.write_text(yaml.safe_dump({**cfg, "checkpoints": [str(bert_case / "ckpt_1")]}))
    assert cli("run", path, "--quiet") == 0
    assert MergeState.open(state_dir).meta["base"]["hash"] == hashed.meta["base"]["hash"]
    assert cli("add", tmp_path / "by-init", bert_case / "ckpt_1", "--quiet") == 0
    assert MergeState.open(tmp_path / "by-init").meta["base"]["hash"] == hashed.meta["base"]["hash"]


def test_bad_parameters_and_states(bert_case, tmp_path, capsys):
    assert cli("init", tmp_path / "s", "--base", bert_case / "base", "--method", "opcm", "--set", "alpha=2") == 1
    assert "alpha" in capsys.readouterr().err
    assert cli("init", tmp_path / "s", "--base", bert_case / "base", "--method", "opcm", "--set", "beta=1") == 1
    assert "beta" in capsys.readouterr().err
    assert cli("add", tmp_path / "nothing", bert_case / "ckpt_1") == 1
    assert "not a foldin state" in capsys.readouterr().err
    cli("init", tmp_path / "s", "--base", bert_case / "base", "--method", "opcm")
    (tmp_path / "s" / "state.json").write_text("{oops")
    assert cli("info", tmp_path / "s") == 1
    assert "corrupted" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["add", "export"])
def test_a_full_disk_gives_a_clear_error_and_loses_nothing(bert_case, tmp_path, monkeypatch, capsys, command):
    import errno

    import foldin.io.safetensors_file as stf

    state = tmp_path / "state"
    cli("init", state, "--base", bert_case / "base", "--method", "opcm")
    cli("add", state, bert_case / "ckpt_1", "--quiet")
    cli("export", state, tmp_path / "out", "--quiet")
    before, exported = snapshot(state), snapshot(tmp_path / "out")
    calls = {"n": 0}
    real_pwrite = os.pwrite

    def pwrite_until_full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(stf.os, "pwrite", pwrite_until_full)
    args = (
        ("add", state, bert_case / "ckpt_2")
        if command == "add"
        else ("export", state, tmp_path / "out", "--overwrite")
    )
    capsys.readouterr()
    assert cli(*args, "--quiet") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1
    assert snapshot(state) == before and snapshot(tmp_path / "out") == exported
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no half-written folder left
    monkeypatch.undo()
    assert cli("add", state, bert_case / "ckpt_2", "--quiet") == 0


def test_a_second_writer_fails_clearly(bert_case, tmp_path):
    import fcntl

    state = MergeState.create(tmp_path / "s", bert_case / "base", "opcm")
    fd = os.open(tmp_path / "s" / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process is in the middle of an add
    try:
        with pytest.raises(Exception, match="in use by another foldin process"):
            state.add(bert_case / "ckpt_1", progress=False)
    finally:
        os.close(fd)
    assert MergeState.open(tmp_path / "s").step == 0


def _flip_byte(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["add", "export", "verify"])
def test_a_flipped_bit_in_the_merged_tensors_is_reported_never_merged(bert_case, tmp_path, capsys, command):
    state = tmp_path / "state"
    cli("init", state, "--base", bert_case / "base", "--method", "task_arithmetic")
    cli("add", state, bert_case / "ckpt_1", "--quiet")
    assert cli("verify", state) == 0
    _flip_byte(next(state.glob("gen-*")) / "merged.safetensors")
    before = snapshot(state)
    capsys.readouterr()
    args = {
        "add": ("add", state, bert_case / "ckpt_2", "--quiet"),
        "export": ("export", state, tmp_path / "out", "--quiet"),
        "verify": ("verify", state),
    }[command]
    assert cli(*args) == 1
    err = capsys.readouterr().err
    assert "corrupted" in err and "checksum" in err and err.count("\n") == 1
    assert snapshot(state) == before and not (tmp_path / "out").exists()


def test_a_changed_state_json_is_reported(bert_case, tmp_path, capsys):
    state = tmp_path / "state"
    cli("init", state, "--base", bert_case / "base", "--method", "opcm")
    cli("add", state, bert_case / "ckpt_1", "--quiet")
    meta = json.loads((state / "state.json").read_text())
    meta["stats"]["scale"] = meta["stats"]["scale"] * 1.0001  # valid JSON, wrong content
    (state / "state.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli("info", state) == 1
    assert "does not match its checksum" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value",
    [("generation", "../../elsewhere"), ("step", -1), ("params", {"alpha": "high"}), ("checksums", None)],
)
def test_a_resealed_but_invalid_state_json_is_refused(bert_case, tmp_path, capsys, field, value):
    """Even with a valid seal (a buggy tool, a hand edit), a state.json that points outside its
    directory or contradicts itself is refused in one sentence."""
    from foldin.state.schema import meta_digest as _meta_digest

    state = tmp_path / "state"
    cli("init", state, "--base", bert_case / "base", "--method", "opcm")
    cli("add", state, bert_case / "ckpt_1", "--quiet")
    meta = json.loads((state / "state.json").read_text())
    meta[field] = value
    meta["meta_sha256"] = _meta_digest(meta)
    (state / "state.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert cli("info", state) == 1
    err = capsys.readouterr().err
    assert "is not a valid foldin state" in err and err.count("\n") == 1


def test_a_state_made_before_xxh3_keeps_sha256(bert_case, tmp_path, monkeypatch):
    """States written by earlier versions have sha256 digests and no `checksum` field: they open,
    verify, take new steps in sha256 and still refuse a duplicate."""
    import foldin.state.create as state_module
    from foldin.state.schema import read_meta, write_meta

    with monkeypatch.context() as m:
        m.setattr(state_module, "CHECKSUM", "sha256")
        state = MergeState.create(tmp_path / "old", bert_case / "base", "average")
        state.add(bert_case / "ckpt_1", progress=False)
    meta = read_meta(state.dir)
    del meta["checksum"]
    write_meta(state.dir, meta)
    state = MergeState.open(state.dir)
    assert state.checksum == "sha256" and state.history[0]["hash"].startswith("sha256:")
    state.add(bert_case / "ckpt_2", progress=False)
    digest = next(iter(state.meta["checksums"]["merged"].values()))
    assert state.history[1]["hash"].startswith("sha256:") and len(digest) == 64  # bare sha256 hex
    assert state.verify() > 0
    with pytest.raises(FoldinError, match="already folded in at step 1"):
        state.add(bert_case / "ckpt_1", progress=False)
    fresh = MergeState.create(tmp_path / "new", bert_case / "base", "average")
    fresh.add(bert_case / "ckpt_1", progress=False)
    assert fresh.checksum == "xxh3_128" and fresh.meta["base"]["hash"].startswith("xxh3_128:")


METHODS = [(name, {}) for name in ("task_arithmetic", "average", "ties", "magmax", "dop", "opcm")]


@pytest.mark.parametrize("method, params", [*METHODS, ("dop", {"solver": "exact"})], ids=lambda v: str(v or ""))
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_step_exports_in_the_same_pass_bit_for_bit(bert_case, tmp_path, method, params, dtype):
    """`foldin run` writes the export during its last step where the method's scale is known
    beforehand (opcm's is not: it exports after); the folder equals a separate `export`."""
    fused, apart = (MergeState.create(tmp_path / n, bert_case / "base", method, params) for n in ("fused", "apart"))
    for state in (fused, apart):
        state.add(bert_case / "ckpt_1", progress=False)
    fused.add_and_export(bert_case / "ckpt_2", tmp_path / "out-fused", dtype=dtype, progress=False)
    apart.add(bert_case / "ckpt_2", progress=False)
    apart.export(tmp_path / "out-apart", dtype=dtype, progress=False)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out-fused" / name).read_bytes() == (tmp_path / "out-apart" / name).read_bytes()
    assert fused.meta["checksums"] == apart.meta["checksums"]


def test_a_failed_step_leaves_no_export_behind(bert_case, tmp_path):
    state = MergeState.create(tmp_path / "s", bert_case / "base", "task_arithmetic")
    state.add(bert_case / "ckpt_1", progress=False)
    bad = write_variant(
        bert_case / "ckpt_2", tmp_path / "bad", lambda sd: {**sd, next(iter(sd)): sd[next(iter(sd))] * float("nan")}
    )
    before = snapshot(state.dir)
    with pytest.raises(FoldinError, match="NaN"):
        state.add_and_export(bad, tmp_path / "out", progress=False)
    assert snapshot(state.dir) == before and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written folder beside it


def test_a_sharded_export_in_the_same_pass_equals_a_separate_one(bert_case, tmp_path):
    fused, apart = (MergeState.create(tmp_path / name, bert_case / "base", "magmax") for name in ("fused", "apart"))
    fused.add_and_export(bert_case / "ckpt_1", tmp_path / "out-fused", max_shard_size="40KB", progress=False)
    apart.add(bert_case / "ckpt_1", progress=False)
    apart.export(tmp_path / "out-apart", max_shard_size="40KB", progress=False)
    shards = sorted(p.name for p in (tmp_path / "out-apart").glob("model-*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "out-fused").glob("model-*.safetensors"))
    for name in [*shards, "model.safetensors.index.json"]:
        assert (tmp_path / "out-fused" / name).read_bytes() == (tmp_path / "out-apart" / name).read_bytes()


@pytest.mark.parametrize(
    ("method", "expected"),
    [("average", "average treats every tensor alike)"), ("opcm", "13 linear-layer weights, found by nn.Linear")],
)
def test_init_line_reads_well_for_every_method(bert_case, tmp_path, capsys, method, expected):
    assert cli("init", tmp_path / "s", "--base", bert_case / "base", "--method", method) == 0
    line = capsys.readouterr().out
    assert expected in line and "from not used" not in line


def test_options_travel_as_one_value_and_a_misspelt_field_is_named(bert_case, tmp_path):
    """`add` and `export` take one foldin.Options; keyword arguments change single fields of it,
    and a field it does not have is refused by name before anything is read."""
    from foldin import Options

    state = MergeState.create(tmp_path / "state", bert_case / "base", "average")
    with pytest.raises(TypeError, match="'progres' is not a field of foldin.Options"):
        state.add(bert_case / "ckpt_1", progres=False)
    assert state.step == 0 and MergeState.open(state.dir).step == 0
    state.add(bert_case / "ckpt_1", Options(progress=False))
    out = state.export(tmp_path / "out", Options(progress=False), dtype="bfloat16")
    assert {t.dtype for t in read_weights(out).values() if t.is_floating_point()} == {torch.bfloat16}
