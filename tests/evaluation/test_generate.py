"""``reglue generate``: sources, determinism across world sizes and interruptions, the streamed
ADM .npz, PNGs, memory, and bad input (CPU, a tiny REGLUE model)."""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from reglue.cli import main as reglue_main
from reglue.config import ConfigError, SampleConfig, apply_overrides
from reglue.evaluation import generate
from reglue.evaluation.generate import BlockPlan, ImageSampler, SampleStore, generate_share
from tests._damage import garble
from reglue.models import build_model
from reglue.models.encoders import build_vae
from reglue.presets import get_preset
from reglue.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "3", "--batch-size", "4"]  # 3-step SDE, blocks of 4 samples


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread here and in every subprocess: CPU reductions split over threads round
    differently, and bit-identity is claimed at equal thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny REGLUE run after one training step (its EMA differs from the initialisation)."""
    config = apply_overrides(get_preset("tiny"), {
        "train.out_dir": str(tmp_path_factory.mktemp("runs")), "train.name": "tiny", "train.max_steps": "1",
        "train.global_batch_size": "4", "train.num_sample_images": "1", "sample.steps": "2",
        "data.synthetic_size": "64", "train.tensorboard": "false", "train.metrics_plot": "false", "train.log_every": "1",
        # a VAE every source can build (the demo's patch autoencoder lives in its run directory)
        "encoders.vae": "tiny-random"})
    return Trainer(config).fit()


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The run's EMA as `reglue export` writes it (.safetensors with the config) and in the
    published train.py format (.pt with "ema" and "args")."""
    folder = tmp_path_factory.mktemp("weights")
    safetensors = folder / "ema.safetensors"
    assert reglue_main(["export", "--run", str(run_dir), "--out", str(safetensors)]) == 0
    from safetensors.torch import load_file

    published = folder / "published.pt"
    torch.save({"ema": load_file(str(safetensors)), "args": argparse.Namespace(model="tiny")}, published)
    return {"safetensors": safetensors, "pt": published}


@pytest.fixture(scope="module")
def reference(exported, tmp_path_factory):
    """16 samples (4 blocks of 4) from the exported weights, generated uninterrupted in this process."""
    out = tmp_path_factory.mktemp("reference") / "reference.npz"
    assert run_generate("--weights", exported["safetensors"], "--out", out, "--num", 16, *FAST) == 0
    return out


def run_generate(*args) -> int:
    return reglue_main(["generate", *map(str, args)])


def load(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    return env


def test_sources_agree_and_npz_is_adm_format(run_dir, exported, reference, tmp_path):
    """--run, the exported .safetensors and the published .pt + --preset give the same samples;
    the .npz is arr_0 uint8 (N, H, W, 3) + arr_1 labels, loadable by plain numpy; labels balanced."""
    ref = load(reference)
    assert sorted(ref) == ["arr_0", "arr_1"]
    assert ref["arr_0"].dtype == np.uint8 and ref["arr_0"].shape == (16, 64, 64, 3)
    assert ref["arr_1"].dtype == np.int64 and ref["arr_1"].shape == (16,)
    assert np.bincount(ref["arr_1"], minlength=8).tolist() == [2] * 8  # tiny: 8 classes, 16 samples
    assert ref["arr_0"].std() > 5  # images, not a constant
    record = json.loads(Path(str(reference) + ".json").read_text())
    assert record["num"] == 16 and record["generation"]["batch_size"] == 4 and record["generation"]["sample"]["steps"] == 3
    assert not Path(str(reference) + ".parts").exists()
    outs = {"run": tmp_path / "run.npz", "pt": tmp_path / "pt.npz"}
    assert run_generate("--run", run_dir, "--out", outs["run"], "--num", 16, *FAST) == 0
    assert run_generate("--weights", exported["pt"], "--preset", "tiny", "--vae", "tiny-random", "--out", outs["pt"], "--num", 16, *FAST) == 0
    for name, path in outs.items():
        got = load(path)
        assert np.array_equal(got["arr_0"], ref["arr_0"]) and np.array_equal(got["arr_1"], ref["arr_1"]), name
    # sample i does not depend on --num (the last block is drawn whole and cut)
    assert run_generate("--weights", exported["safetensors"], "--out", tmp_path / "ten.npz", "--num", 10, *FAST) == 0
    ten = load(tmp_path / "ten.npz")
    assert np.array_equal(ten["arr_0"], ref["arr_0"][:10]) and np.array_equal(ten["arr_1"], ref["arr_1"][:10])
    # the same command again finds the output complete and leaves it alone
    before = reference.stat().st_mtime_ns
    assert run_generate("--weights", exported["safetensors"], "--out", reference, "--num", 16, *FAST) == 0
    assert reference.stat().st_mtime_ns == before


def test_in_memory_shares_equal_the_written_samples(exported, reference):
    """generate_share (the API an in-training evaluation calls) gives each rank exactly its part
    of what `reglue generate` writes."""
    written = load(reference)
    source = generate.load_source(argparse.Namespace(weights=str(exported["safetensors"]), run=None, checkpoint=None,
                                                     preset=None, config=None, set=[]))
    config = source.config
    sampler = ImageSampler.from_state(config, source.model.state_dict(), build_vae(config.encoders.vae, seed=config.train.seed),
                                      torch.device("cpu"), apply_overrides(config, {"sample.steps": "3"}).sample)
    plan = BlockPlan(num=16, batch_size=4, seed=0, num_classes=8)
    seen = np.zeros(16, bool)
    for rank in range(2):
        indices, images, labels = generate_share(sampler, plan, rank, 2)
        assert images.dtype == np.uint8 and images.shape == (len(indices), 64, 64, 3)
        assert np.array_equal(images, written["arr_0"][indices]) and np.array_equal(labels, written["arr_1"][indices])
        seen[indices] = True
    assert seen.all()


def test_one_and_two_processes_are_bit_identical(exported, tmp_path):
    """torchrun with 2 ranks (gloo) writes the same bytes as one process (3 blocks: uneven shares,
    a cut last block; random labels)."""
    args = ["generate", "--weights", str(exported["safetensors"]), "--num-samples", "10", "--labels", "random", *FAST]
    assert reglue_main([*args, "--out", str(tmp_path / "one.npz")]) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "reglue.cli", *args, "--out", str(tmp_path / "two.npz")],
                         cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one, two = load(tmp_path / "one.npz"), load(tmp_path / "two.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert one["arr_1"].min() >= 0 and one["arr_1"].max() < 8 and not np.array_equal(one["arr_1"], np.arange(10) % 8)


KILL_AT_THIRD_BLOCK = """
import os, signal, sys
renames = []
real_replace = os.replace
def replace(src, dst):
    if os.path.basename(str(dst)).startswith("block-"):
        renames.append(dst)
        if len(renames) == 3:  # the third block is written to its .tmp file but never renamed
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
from reglue.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_the_uninterrupted_result(exported, reference, tmp_path, monkeypatch):
    """SIGKILL while the third block is being saved: the two finished blocks survive, the re-run
    draws only the rest (and the PNGs the killed run did not write), and the result equals the
    uninterrupted run."""
    args = ["generate", "--weights", str(exported["safetensors"]), "--num", "16", *FAST,
            "--out", str(tmp_path / "resumed.npz"), "--png", str(tmp_path / "png")]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_THIRD_BLOCK, *args], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    parts = tmp_path / "resumed.npz.parts"
    assert sorted(p.name for p in parts.glob("block-*")) == ["block-000000.npz", "block-000001.npz"]
    assert len(list(parts.glob(".block-000002.npz.*.tmp.npz"))) == 1  # written, never renamed
    assert not (tmp_path / "resumed.npz").exists()

    drawn = []
    real_sample_block = ImageSampler.sample_block
    monkeypatch.setattr(ImageSampler, "sample_block", lambda self, plan, k: drawn.append(k) or real_sample_block(self, plan, k))
    assert reglue_main(args) == 0
    assert drawn == [2, 3]
    resumed, straight = load(tmp_path / "resumed.npz"), load(reference)
    assert np.array_equal(resumed["arr_0"], straight["arr_0"]) and np.array_equal(resumed["arr_1"], straight["arr_1"])
    from PIL import Image

    png = tmp_path / "png"
    assert sorted(p.name for p in png.iterdir()) == [f"{i:06d}.png" for i in range(16)]
    assert all(np.array_equal(np.asarray(Image.open(png / f"{i:06d}.png")), straight["arr_0"][i]) for i in range(16))


def test_blocks_of_other_settings_are_not_mixed_in(exported, reference, tmp_path, monkeypatch, capsys):
    """A failure before assembly keeps the finished blocks; a re-run with another seed refuses to
    use them, naming what differs; the same seed redraws a truncated block and finishes."""
    out = tmp_path / "s.npz"

    def fail(*_):
        raise RuntimeError("injected failure before assembly")

    monkeypatch.setattr(SampleStore, "assemble", fail)
    with pytest.raises(RuntimeError, match="injected"):
        run_generate("--weights", exported["safetensors"], "--out", out, "--num", 8, *FAST)
    monkeypatch.undo()
    capsys.readouterr()
    blocks = sorted(Path(str(out) + ".parts").glob("block-*.npz"))
    assert len(blocks) == 2
    assert run_generate("--weights", exported["safetensors"], "--out", out, "--num", 8, *FAST, "--seed", 1) == 2
    err = capsys.readouterr().err
    assert "was started with other settings (seed: 0 there, 1 now)" in err and "--overwrite" in err and err.count("\n") == 1
    assert sorted(Path(str(out) + ".parts").glob("block-*.npz")) == blocks
    blocks[1].write_bytes(blocks[1].read_bytes()[:1000])  # disk damage
    drawn = []
    real_sample_block = ImageSampler.sample_block
    monkeypatch.setattr(ImageSampler, "sample_block", lambda self, plan, k: drawn.append(k) or real_sample_block(self, plan, k))
    assert run_generate("--weights", exported["safetensors"], "--out", out, "--num", 8, *FAST) == 0
    assert drawn == [1]
    got, want = load(out), load(reference)
    assert np.array_equal(got["arr_0"], want["arr_0"][:8]) and np.array_equal(got["arr_1"], want["arr_1"][:8])


def test_a_complete_output_is_found_done_refused_naming_the_setting_or_overwritten(exported, reference, tmp_path, capsys):
    import shutil

    out = tmp_path / "s.npz"
    shutil.copy(reference, out)
    shutil.copy(str(reference) + ".json", str(out) + ".json")
    weights = ["--weights", exported["safetensors"], "--out", out]
    assert run_generate(*weights, "--num", 16, *FAST) == 0
    assert "is already complete (16 samples with these settings); nothing to do" in capsys.readouterr().out
    assert run_generate(*weights, "--num", 4, *FAST, "--seed", 1) == 2
    assert one_error_line(capsys) == (f"reglue generate: error: --out {out} was started with other settings (num: 16 there, "
                                      "4 now; seed: 0 there, 1 now): run with those settings to resume it, or pass "
                                      "--overwrite to start afresh")
    assert run_generate(*weights, "--num", 4, *FAST, "--png", tmp_path / "png", "--overwrite") == 0
    got, want = load(out), load(reference)
    assert got["arr_0"].shape[0] == 4 and np.array_equal(got["arr_0"], want["arr_0"][:4])
    capsys.readouterr()
    assert run_generate("--weights", exported["safetensors"], "--out", tmp_path / "t.npz", "--num", 4, *FAST,
                        "--png", tmp_path / "png") == 2  # the PNGs of the generation above
    line = one_error_line(capsys)
    assert line.startswith(f"reglue generate: error: --png {tmp_path / 'png'}: holds PNGs") and "--overwrite" in line


def test_streamed_npz_memory_does_not_grow_with_n(tmp_path):
    """Assembling the .npz from block files holds about one block, whatever N (tracemalloc sees
    numpy's buffers); the result loads with numpy and keeps every block's content in order."""
    shape, batch = (32, 32, 3), 100
    block_bytes = batch * int(np.prod(shape))

    def assemble(num):
        store = SampleStore(tmp_path / f"n{num}.npz")
        plan = BlockPlan(num=num, batch_size=batch, seed=0, num_classes=10)
        store.write_manifest({"test": num})
        for k in range(plan.num_blocks):
            images = np.full((batch, *shape), k % 251, np.uint8)
            store.write_block(k, images, np.arange(k * batch, (k + 1) * batch) % 10)
        tracemalloc.start()
        store.assemble(plan, shape, {"test": num})
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return store.out, peak

    small_path, small_peak = assemble(250)
    large_path, large_peak = assemble(6050)  # 18 MB of images
    assert large_peak < 5 * block_bytes, (small_peak, large_peak)  # a block read, a read buffer, the zip's
    assert large_peak < small_peak + block_bytes // 2, (small_peak, large_peak)
    data = np.load(large_path)
    images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6050, *shape) and labels.shape == (6050,)
    assert np.array_equal(images[::batch, 0, 0, 0], np.arange(61) % 251)
    assert np.array_equal(labels, np.arange(6050) % 10)


def test_a_damaged_block_file_is_refused_when_assembling(tmp_path):
    """Block files are zip .npz: a same-size garble fails numpy's CRC check, named in one line, and
    no OUT is written."""
    store = SampleStore(tmp_path / "s.npz")
    plan = BlockPlan(num=8, batch_size=4, seed=0, num_classes=10)
    store.write_manifest({"test": 1})
    for k in range(2):
        store.write_block(k, np.random.default_rng(k).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.arange(4))
    garble(store.block_path(1), size=64)
    assert store.pending(plan) == []  # its zip directory reads: only the CRC tells
    with pytest.raises(ValueError, match=r"block file .*block-000001\.npz is damaged .*CRC-32.*run the same command"):
        store.assemble(plan, (32, 32, 3), {"test": 1})
    assert not store.out.exists()


def test_sample_flags_cover_every_sample_config_field():
    parser = argparse.ArgumentParser()
    generate.add_sample_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {"sample_" + f.name for f in dataclasses.fields(SampleConfig)} <= flags
    args = parser.parse_args(["--sampler", "heun", "--steps", "7", "--cfg-scale", "1.5", "--cls-cfg-scale", "none",
                              "--guidance-interval", "0.1", "0.8", "--guide-channels", "4"])
    sample = apply_overrides(get_preset("tiny"), generate.sample_overrides(args)).sample
    assert (sample.sampler, sample.steps, sample.cfg_scale, sample.cls_cfg_scale, sample.guidance_interval,
            sample.guide_channels) == ("heun", 7, 1.5, None, (0.1, 0.8), 4)
    assert generate.sample_overrides(parser.parse_args([])) == {}
    with pytest.raises(ConfigError, match="sample.cfg_scale"):
        apply_overrides(get_preset("tiny"), generate.sample_overrides(parser.parse_args(["--cfg-scale", "0.5"])))


def test_every_flag_has_a_spelling_torchrun_passes_through():
    """torchrun's parser takes abbreviations of its own options (--num of --numa-binding, --run of
    --run-path) even after the module name: each generate option needs a spelling that is none."""
    from torch.distributed.run import get_args_parser

    from reglue.cli import build_parser

    torchrun = [o for a in get_args_parser()._actions for o in a.option_strings if o.startswith("--")]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in commands.choices["generate"]._actions:
        spellings = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
        if spellings:
            assert any(not any(t.startswith(o) for t in torchrun) for o in spellings), spellings


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_output_paths_fail_before_any_work(exported, tmp_path, capsys, monkeypatch):
    def no_loading(*_):
        raise AssertionError("weights were loaded before the output path was checked")

    monkeypatch.setattr(generate, "load_source", no_loading)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    weights = ["--weights", exported["safetensors"]]
    assert run_generate(*weights, "--out", blocker / "s.npz") == 2
    assert "a file is in the way" in one_error_line(capsys)
    assert run_generate(*weights, "--out", tmp_path / "s.png") == 2
    assert "must end in .npz" in one_error_line(capsys)
    assert run_generate(*weights, "--out", tmp_path / "s.npz", "--png", blocker / "png") == 2
    line = one_error_line(capsys)
    assert "--png" in line and "a file is in the way" in line
    monkeypatch.undo()
    foreign = tmp_path / "foreign.npz"
    foreign.write_bytes(b"someone else's file")
    assert run_generate(*weights, "--out", foreign, "--num", 4, *FAST) == 2
    assert "already exists (not written by reglue generate" in one_error_line(capsys)
    assert foreign.read_bytes() == b"someone else's file" and blocker.read_text() == "keep me"


def test_bad_weights_are_one_clear_line(exported, tmp_path, capsys):
    out = ["--out", tmp_path / "s.npz", "--num", 4, *FAST]
    other = build_model(apply_overrides(get_preset("tiny"), {"model.depth": "2", "model.encoder_depth": "1"}))
    torch.save({"ema": other.state_dict()}, tmp_path / "other.pt")
    assert run_generate("--weights", tmp_path / "other.pt", "--preset", "tiny", *out) == 2
    err = one_error_line(capsys)
    assert "does not match --preset tiny" in err and "missing keys" in err and "blocks.2" in err
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(exported["pt"].read_bytes()[:5000])
    assert run_generate("--weights", truncated, "--preset", "tiny", *out) == 2
    assert "cannot read it" in one_error_line(capsys)
    assert run_generate("--weights", exported["pt"], *out) == 2
    assert "add --preset" in one_error_line(capsys)
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(exported["safetensors"].read_bytes())
    garble(garbled, size=64)  # same size: only the export's checksum tells
    assert run_generate("--weights", garbled, *out) == 2
    err = one_error_line(capsys)
    assert str(garbled) in err and "the file is damaged: CRC-32" in err and "export it again" in err
    assert run_generate("--weights", exported["pt"], "--preset", "no-such-preset", *out) == 2
    assert "unknown preset" in one_error_line(capsys)
    assert not (tmp_path / "s.npz").exists()
    assert run_generate("--weights", truncated, "--preset", "tiny", "--out", tmp_path / "new" / "dir" / "s.npz",
                        "--png", tmp_path / "pngs", "--num", 4, *FAST) == 2
    assert "cannot read it" in one_error_line(capsys)
    assert not (tmp_path / "new").exists() and not (tmp_path / "pngs").exists()  # a failed start leaves nothing


@pytest.mark.gpu
def test_sde_sampler_loop_never_waits_for_the_gpu():
    """No host synchronisation inside the sampling loop (CUDA sync debug mode raises on one)."""
    from reglue.diffusion.samplers import euler_maruyama

    class Linear(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y, cls_token=None):
            return -x * t[:, None, None, None], [], -cls_token

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    x, cls = torch.randn(4, 8, 4, 4, device=device), torch.randn(4, 16, device=device)
    y = torch.zeros(4, dtype=torch.long, device=device)
    model = Linear().eval()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        euler_maruyama(model, x, y, cls, num_steps=10, cfg_scale=2.0, guidance_interval=(0.0, 0.9), generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_too_little_disk_space_is_refused_before_sampling(exported, tmp_path, capsys, monkeypatch):
    def one_kib_free(path):
        return types.SimpleNamespace(total=2**30, used=2**30 - 1024, free=1024)

    monkeypatch.setattr(generate.shutil, "disk_usage", one_kib_free)
    out = tmp_path / "s.npz"
    assert run_generate("--weights", exported["safetensors"], "--out", out, "--num", 8, *FAST) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"reglue generate: error: --out {out}: needs about ") and "but 1 KiB are free" in line, line
    assert not out.exists()
