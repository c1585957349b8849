"""Checkpoints: complete only with their marker, damage of every kind detected and skipped (never
deleted), the newest loadable one used, pruning limited to the run's own complete checkpoints."""

import json
import logging
import re
import shutil

import pytest
import torch

from reglue import checkpoint as ckpt
from reglue.runtime import DistInfo
from reglue.integrity import crc32_file
from tests import _damage as damage


def save(run, step, run_id="run-a", keep_last=10):
    """A checkpoint whose weights all equal ``step``."""
    model = torch.nn.Linear(64, 32)
    torch.nn.init.constant_(model.weight, step)
    torch.nn.init.constant_(model.bias, step)
    return ckpt.save_checkpoint(run, step, {"model": model.state_dict()}, {"config": {}, "run_id": run_id}, DistInfo(),
                                keep_last)


def load(path):
    """Load a checkpoint of :func:`save`; returns its meta, checks the weights it restored."""
    model = torch.nn.Linear(64, 32)
    state = {"model": model.state_dict()}
    meta = ckpt.load_checkpoint(path, state)
    model.load_state_dict(state["model"])
    assert torch.all(model.weight == meta["step"])
    return meta


def steps(run):
    return [int(p.name[5:]) for p in ckpt.list_checkpoints(run)]


def truncate(path, name):
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])


def garble(path, name, at=None):
    """Same size, wrong bytes (in the middle, or at ``at``): only the checksum (or loading) can tell."""
    damage.garble(path / name, size=64, at=at)


def alter_meta(path):
    """meta.json rewritten at the same size with another step: valid JSON, sizes unchanged."""
    text = (path / "meta.json").read_text()
    (path / "meta.json").write_text(text.replace('"step": 3', '"step": 4'))


def rewrite(path, name, text):
    """Replace a file and its size in the marker: damage that only a reader of the file sees."""
    (path / name).write_text(text)
    marker = json.loads((path / "complete.json").read_text())
    marker["files"][name] = len(text)
    (path / "complete.json").write_text(json.dumps(marker))


DAMAGE = {
    "truncated shard": (lambda p: truncate(p, "__0_0.distcp"), "__0_0.distcp is truncated"),
    "missing shard": (lambda p: (p / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "missing .metadata": (lambda p: (p / ".metadata").unlink(), ".metadata is missing"),
    "missing meta.json": (lambda p: (p / "meta.json").unlink(), "meta.json is missing"),
    "meta.json of the wrong type": (lambda p: rewrite(p, "meta.json", "[]"), "must be a JSON object, got list"),
    "unreadable marker": (lambda p: (p / "complete.json").write_text("{trunc"), "unreadable completion marker"),
    "missing marker": (lambda p: (p / "complete.json").unlink(), "no complete.json"),
    "garbled shard start": (lambda p: garble(p, "__0_0.distcp", at=0), "__0_0.distcp is damaged: CRC-32"),
    "garbled shard middle": (lambda p: garble(p, "__0_0.distcp"), "__0_0.distcp is damaged: CRC-32"),
    "garbled .metadata": (lambda p: garble(p, ".metadata"), ".metadata is damaged: CRC-32"),
    "altered meta.json": (alter_meta, "meta.json is damaged: CRC-32"),
    "damaged checksum list": (lambda p: (p / "complete.json").write_text(
        '{"files": {".metadata": 1, "meta.json": 1}, "crc32": {"meta.json": "0"}}'), "its checksums do not list"),
}


def test_newest_of_several_checkpoints_is_resumed(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step)
    path, meta = ckpt.load_newest(tmp_path, load)
    assert path.name == "step-00000003" and meta["step"] == 3
    assert ckpt.latest_checkpoint(tmp_path) == path


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_skipped_and_kept(tmp_path, caplog, kind):
    damage, reason = DAMAGE[kind]
    for step in (1, 2, 3):
        save(tmp_path, step)
    damaged = tmp_path / "checkpoints" / "step-00000003"
    damage(damaged)
    with caplog.at_level(logging.WARNING, logger="reglue.checkpoint"):
        path, meta = ckpt.load_newest(tmp_path, load)
    assert meta["step"] == 2
    warnings = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and reason in warnings[0], warnings
    assert damaged.is_dir(), "a damaged checkpoint must never be deleted"
    with pytest.raises(ckpt.CheckpointError, match=reason.split(" (")[0]):
        load(damaged)  # asked for by name: an error, no fallback


def test_no_loadable_checkpoint_is_an_error_listing_them(tmp_path):
    for step in (1, 2):
        save(tmp_path, step)
    truncate(tmp_path / "checkpoints" / "step-00000002", "__0_0.distcp")
    (tmp_path / "checkpoints" / "step-00000001" / ".metadata").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"none of the 2 .*step-00000002 .*truncated.*step-00000001 .*\.metadata"):
        ckpt.load_newest(tmp_path, load)
    assert ckpt.load_newest(tmp_path / "elsewhere", load) is None


def test_marker_lists_every_file_and_an_interrupted_save_is_no_checkpoint(tmp_path, monkeypatch):
    path = save(tmp_path, 1)
    marker = json.loads((path / "complete.json").read_text())
    assert set(marker["files"]) == {p.name for p in path.iterdir()} - {"complete.json"}
    assert marker["files"][".metadata"] == (path / ".metadata").stat().st_size
    assert marker["crc32"] == {name: f"{crc32_file(path / name):08x}" for name in marker["files"]}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_write_json_durable", crash)  # killed after the shards, before meta and marker
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert steps(tmp_path) == [1] and ckpt.load_newest(tmp_path, load)[1]["step"] == 1


def test_pruning_keeps_damaged_and_other_runs_checkpoints(tmp_path):
    save(tmp_path, 1, run_id="other-run")
    for step in (2, 3):
        save(tmp_path, step, keep_last=2)
    truncate(tmp_path / "checkpoints" / "step-00000003", "__0_0.distcp")
    for step in (4, 5, 6):
        save(tmp_path, step, keep_last=2)
    # run-a's complete checkpoints: 2, 4, 5, 6 -> keep the newest 2; step 3 (damaged) and step 1 (another run) stay
    assert steps(tmp_path) == [1, 3, 5, 6]
    save(tmp_path, 7, keep_last=1)
    assert steps(tmp_path) == [1, 3, 7] and ckpt.load_newest(tmp_path, load)[1]["step"] == 7


def test_saving_over_a_damaged_checkpoint_moves_it_aside(tmp_path):
    save(tmp_path, 1)
    truncate(tmp_path / "checkpoints" / "step-00000001", "__0_0.distcp")
    save(tmp_path, 1)
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-00000001.replaced-")]
    assert len(aside) == 1 and load(tmp_path / "checkpoints" / "step-00000001")["step"] == 1


def test_copied_run_keeps_working(tmp_path):
    """A run directory copied elsewhere (e.g. to another file system) resumes from the copy."""
    for step in (1, 2):
        save(tmp_path / "a", step)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert ckpt.load_newest(tmp_path / "b", load)[0] == tmp_path / "b" / "checkpoints" / "step-00000002"


def full_disk(monkeypatch, after_calls=0):
    """``torch.save`` (DCP's shard writer) writes part of its data, then fails as a full disk does."""
    import errno

    real, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= after_calls:
            return real(obj, f, *args, **kwargs)
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)


@pytest.mark.parametrize("where", ["shards", "marker"])
def test_a_failed_save_is_one_error_removes_its_partial_files_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch,
                                                                                                   where):
    save(tmp_path, 1)
    if where == "shards":
        full_disk(monkeypatch)
        reason = "No space left on device"
    else:
        def marker_fails(path, value):
            raise OSError(30, "Read-only file system", str(path))

        monkeypatch.setattr(ckpt, "_write_json_durable", marker_fails)
        reason = "meta.json: Read-only file system"
    with pytest.raises(ckpt.CheckpointSaveError) as err:
        save(tmp_path, 2)
    monkeypatch.undo()
    message = str(err.value)
    assert "\n" not in message and "step-00000002" in message and reason in message and "free there" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000001"]  # no .tmp left
    assert ckpt.load_newest(tmp_path, load)[1]["step"] == 1
    assert steps(tmp_path) == [1] and save(tmp_path, 2).name == "step-00000002"  # space again: saves as usual


def failing_save_worker(rank, init_dir, run_dir, where):
    """Two gloo ranks save step 1, then step 2 fails on one rank only; both must raise, none hang."""
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_dir}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    info = DistInfo(rank=rank, world_size=2)
    try:
        state = {"model": {f"w{rank}": torch.full((8,), float(rank))}}  # per-rank keys: each rank writes a shard
        ckpt.save_checkpoint(run_dir, 1, state, {"run_id": "r"}, info, keep_last=5)
        patch = pytest.MonkeyPatch()
        if where == "shards" and rank == 1:
            full_disk(patch)
        if where == "marker" and rank == 0:
            patch.setattr(ckpt, "_write_json_durable", lambda path, value: (_ for _ in ()).throw(OSError(28, "No space left on device")))
        try:
            ckpt.save_checkpoint(run_dir, 2, state, {"run_id": "r"}, info, keep_last=5)
            outcome = "saved"
        except ckpt.CheckpointSaveError as exc:
            outcome = str(exc)
        patch.undo()
        first = ckpt.checkpoint_dir(run_dir) / "step-00000001"
        if rank == 0:
            garble(first, "__0_0.distcp")  # rank 1 verifies it (every world_size-th file): both must hear of it
        dist.barrier()
        found = ckpt.content_damage(first)
        with open(f"{run_dir}/outcome{rank}", "w") as f:
            f.write(f"{outcome}\n{found}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("where", ["shards", "marker"])
def test_a_save_failing_on_one_rank_fails_on_every_rank(tmp_path, where):
    import torch.multiprocessing as mp

    run = tmp_path / "run"
    mp.spawn(failing_save_worker, args=(str(tmp_path / "init"), str(run), where), nprocs=2, join=True)
    outcomes, found = zip(*((run / f"outcome{rank}").read_text().split("\n") for rank in (0, 1)))
    assert found[0] == found[1] and found[0].startswith("__0_0.distcp is damaged: CRC-32"), found
    for rank, outcome in enumerate(outcomes):
        assert "No space left on device" in outcome and "step-00000002" in outcome, (rank, outcome)
    # both ranks measured the partial files before rank 0 removed them (no rank races the cleanup)
    written = [re.search(r", ([0-9.]+ \w+) of the checkpoint written", o).group(1) for o in outcomes]
    assert written[0] == written[1], outcomes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]


def test_a_checkpoint_saved_before_checksums_still_loads(tmp_path):
    """Markers without ``crc32`` (older saves) are checked by size only."""
    path = save(tmp_path, 1)
    marker = json.loads((path / "complete.json").read_text())
    del marker["crc32"]
    (path / "complete.json").write_text(json.dumps(marker))
    assert ckpt.checkpoint_damage(path) is None and ckpt.content_damage(path) is None
    assert load(path)["step"] == 1
