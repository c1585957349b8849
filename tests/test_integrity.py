"""Checksums of the files reglue writes and reads back (reglue.integrity): each reader of a
.safetensors file we wrote refuses a same-size garble or a truncation in one line naming the file;
files without our checksum (published weights) still load."""

import pytest
import torch

from reglue import integrity
from reglue.integrity import DamagedFileError, load_safetensors, save_safetensors, verify_safetensors
from tests._damage import garble, truncate


def _autoencoder(path):
    from reglue.models.autoencoder import PatchAutoencoder

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    PatchAutoencoder.fit(images).save(path)
    return lambda: PatchAutoencoder.load(path)


def _feature_stats(path):
    from reglue.models.encoders import FeatureStats

    FeatureStats(torch.randn(768), torch.rand(768) + 0.5).save(path)
    return lambda: FeatureStats.load(path)


def _pca(path):
    from reglue.models.encoders import PCA

    PCA.fit(torch.randn(6, 16, 4, 4), n_components=4).save(path)
    return lambda: PCA.load(path)


def _compressor(path):
    from reglue.data.train_compressor import _save_weights
    from reglue.models.compressor import SemanticCompressor, load_compressor

    _save_weights(SemanticCompressor((32, 16, 4)), path)
    return lambda: load_compressor(path)


def _exported_sit(path):
    """What `reglue export` writes (metadata with the config), read as `generate --weights` reads it."""
    from reglue.models import build_model
    from reglue.models.sit import load_sit_checkpoint
    from reglue.presets import get_preset

    config = get_preset("tiny")
    save_safetensors({k: v.contiguous() for k, v in build_model(config, kernels="eager").state_dict().items()}, path,
                     metadata={"config": config.to_json()})
    return lambda: load_sit_checkpoint(build_model(config, kernels="eager"), str(path))


READERS = {"autoencoder": _autoencoder, "feature_stats": _feature_stats, "pca": _pca, "compressor": _compressor,
           "exported SiT": _exported_sit}


@pytest.mark.parametrize("damage", ["garbled", "truncated"])
@pytest.mark.parametrize("kind", sorted(READERS))
def test_every_safetensors_reader_refuses_damage_in_one_line(tmp_path, kind, damage):
    path = tmp_path / "file.safetensors"
    read = READERS[kind](path)
    read()  # intact: loads
    assert verify_safetensors(path)
    garble(path, size=64) if damage == "garbled" else truncate(path, 0.9)
    with pytest.raises(DamagedFileError) as caught:
        read()
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "damaged" in message and len(message.splitlines()) == 1, message


def test_the_checksum_covers_header_and_data_and_files_without_one_load_unverified(tmp_path):
    from safetensors.torch import save_file

    tensors = {"w": torch.arange(1000.0)}
    save_safetensors(tensors, tmp_path / "ours.safetensors", {"note": "kept"})
    loaded, metadata = load_safetensors(tmp_path / "ours.safetensors")
    assert torch.equal(loaded["w"], tensors["w"]) and metadata == {"note": "kept"}
    raw = (tmp_path / "ours.safetensors").read_bytes()
    (tmp_path / "header.safetensors").write_bytes(raw.replace(b'"kept"', b'"kelp"'))  # valid JSON, same size
    with pytest.raises(DamagedFileError, match="the file is damaged: CRC-32"):
        load_safetensors(tmp_path / "header.safetensors")
    save_file(tensors, tmp_path / "published.safetensors")  # no checksum of ours: nothing to verify
    assert not verify_safetensors(tmp_path / "published.safetensors")
    assert torch.equal(load_safetensors(tmp_path / "published.safetensors")[0]["w"], tensors["w"])


def test_crc_of_a_file_is_streamed_in_chunks(tmp_path, monkeypatch):
    import zlib

    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 1000)  # many chunks, the same CRC
    assert integrity.crc32_file(tmp_path / "f") == zlib.crc32(data)
    assert integrity.crc32_file(tmp_path / "f", 300, 5000) == zlib.crc32(data[300:5300])
