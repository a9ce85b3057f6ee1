"""Model weight files: locate them and verify their sha256 before anything loads them.

A tampered or truncated weight file is refused with a message that names it.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

# Digests of the offline weights in ../shared/models (its SHA256SUMS), keyed by file name, so a
# catalog entry may omit `sha256` for these files and still be verified.
KNOWN_SHA256: dict[str, str] = {
    "FaceBoxesProd.pth": "c0cb2b1e40710c0aa5fc32a8759b1496a0fe0a126c907ca0ffe35b4bd0709d09",
    "mb05_120x120.pth": "f93ed7f1c4c0382b16d7c18480a5f67473c1917a47475a9823924f38aeb27280",
    "param_mean_std_62d_120x120.pkl": "090d7150f77cb66c29ddae21e4508fbde59123dcd1dea7facc24a7ed06d1c795",
    "bfm_68.npz": "f2573e71ee390ce056da47506f07922fc079d0d058652b5a266190013fb88b98",
    "keypoints_sim.npy": "065053f041b03ed32e36641d26fcd9aefef36f6c518899091cdc6038a6246c13",
    "param_whitening.pkl": "df3ee06d60db5435e238f6918b2ee6825e3341959273337c7319474102c06f3a",
    "blazeface.pth": "54ecff653feaaaf1f7d44b6aff28fd2fc50e483a4e847563b6dd261369c43ba4",
    "blazefaceback.pth": "e2c03bb3ae45e769eaaa0a7cc7d4f61f54a5e3fbae6367d870166702e7022b11",
    "anchors.npy": "a10bb2fb93ab54ca426d6c750bfc3aad685028a16dcf231357d03694f261fd95",
    "anchorsback.npy": "a10bb2fb93ab54ca426d6c750bfc3aad685028a16dcf231357d03694f261fd95",
    "det_2.5g.onnx": "041f73f47371333d1d17a6fee6c8ab4e6aecabefe398ff32cca4e2d5eaee0af9",
    "det_500m.onnx": "5e4447f50245bbd7966bd6c0fa52938c61474a04ec7def48753668a9d8b4ea3a",
    "slim_160_latest.onnx": "2121aacea9169ac27227508238237376fe64b96e2f2cc57082f26e88d650fbd2",
    "slim_160_latest.pth": "5a4471de06bfd952c4cba93805fae9aee0c7447040ca0af32a5a44e8275fe903",
    "lm_model0_opt.onnx": "43c9c58f03701cc15b8423c49b78af348a6397334d348887e0fda59013275c29",
    "face_detection_yunet_2026may.onnx": "ebafce4e3c118d6554634be5c27ab333b4c047a9a8c3faf1d7cf93101c22f0f0",
}


class WeightsError(RuntimeError):
    """A weight file is missing or does not match its expected sha256."""


class ModelError(WeightsError):
    """A model of the detector chain cannot be used (its weights are missing or wrong, it fails to
    load, or it fails on every image): the configuration's fault, never the images'."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def verified_path(path: str | os.PathLike, expected_sha256: str | None = None, *, what: str = "weights") -> Path:
    """Return `path` once its sha256 matches; raise WeightsError naming the file otherwise.

    `expected_sha256` defaults to the known digest of a file with that name; a file with neither
    is refused, since we load nothing unverified.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{what} file not found: {path} (check the path in catalog.yaml or FACECURATE_SHARED)")
    expected = expected_sha256 or KNOWN_SHA256.get(path.name)
    if expected is None:
        raise WeightsError(f"{what} file {path} has no known sha256: set `sha256:` for it in catalog.yaml")
    stat = path.stat()
    actual = _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if actual != expected.lower():
        raise WeightsError(
            f"{what} file {path} failed its sha256 check (expected {expected[:12]}..., got {actual[:12]}...): "
            "the file is corrupt or was replaced; restore the original"
        )
    return path
