"""The GPU curation path, checked on the CPU: device-side crops and resizes equal OpenCV's, the
decode router sends only clean JPEGs to nvJPEG and lets the CPU decoder name every fault, EXIF
orientation is applied on the device as PIL does, and labelling device tensors gives the landmarks
the host path gives, within the stated tolerance (docs/benchmarks.md, "GPU path tolerance").

nvJPEG itself needs CUDA and torchvision; the stand-in decoder here is PIL without EXIF handling,
so the routing and orientation code around nvJPEG is what these tests hold."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.catalog import load_catalog
from pipeline.decode import DecodeError, decode_image
from pipeline.device_images import crop_rois, crops_to_numpy, mirror, resize, to_device
from pipeline.gpu_decode import decode_batch, probe_jpeg
from pipeline.labeling import Chain, label_images
from tests.badfiles import awkward_good_files, bad_files, face_jpeg
from tests.conftest import DATA, ROOT

CPU = torch.device("cpu")
LIMITS = {"max_pixels": 40_000_000, "min_side_px": 16}


def _images(n_dev: int = 4) -> list[np.ndarray]:
    paths = sorted((DATA / "aflw2000-dev").glob("*.jpg"))[:n_dev] + sorted((DATA / "scenes").glob("*.jpg"))
    return [decode_image(p.read_bytes()) for p in paths]


def test_device_crops_equal_opencv_crops_within_one_grey_level():
    images = _images(3)
    rng = np.random.default_rng(7)
    rois = []
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        for _ in range(6):  # inside, across the border and far outside, up- and down-scaled
            cx, cy, side = rng.uniform(-80, w + 80), rng.uniform(-80, h + 80), rng.uniform(12, 1.5 * max(h, w))
            rois.append((i, np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)))
    for size in (120, 160):
        host = crop_rois(images, rois, size).astype(int)
        device = crops_to_numpy(crop_rois(to_device(images, CPU), rois, size)).astype(int)
        assert host.shape == device.shape == (len(rois), size, size, 3)
        diff = np.abs(host - device)
        assert diff.max() <= 1 and diff.mean() < 0.2, (diff.max(), diff.mean())
        assert host.std() > 10  # real picture content was compared, not two blank crops


def test_a_crop_inside_the_image_equals_the_same_crop_of_the_image_padded_with_zeros():
    """A window inside the image is resized from the image itself; one across its border from a zero-padded
    copy. Moved onto a canvas of zeros around the image, every window is inside it: the two ways must give
    the same pixels, wherever the window is."""
    from pipeline.crops import crop_roi

    images = _images(2)
    rng = np.random.default_rng(5)
    compared = 0
    for img in images:
        h, w = img.shape[:2]
        pad = max(h, w)  # every window below fits inside the canvas
        canvas = np.zeros((h + 2 * pad, w + 2 * pad, 3), np.uint8)
        canvas[pad:pad + h, pad:pad + w] = img
        for _ in range(10):  # inside and across the border, up- and down-scaled
            cx, cy, side = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(12, 1.2 * max(h, w))
            roi = np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)
            for size in (120, 224):
                want = crop_roi(canvas, roi + pad, size)  # inside the canvas
                np.testing.assert_array_equal(crop_roi(img, roi, size), want)
                compared += want.std() > 10
    assert compared > 10  # real picture content was compared


def test_crops_of_a_mirrored_view_equal_crops_of_a_mirrored_copy():
    """`mirror` gives a host image as a view (the flip pass cuts its crops from it without copying the
    photo): its crops are, pixel for pixel, those of a mirrored copy, inside, across and beyond the
    border, and the image itself is left as it was."""
    images = _images(3)
    before = [img.copy() for img in images]
    rng = np.random.default_rng(11)
    rois = []
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        for _ in range(8):
            cx, cy, side = rng.uniform(-80, w + 80), rng.uniform(-80, h + 80), rng.uniform(12, 1.5 * max(h, w))
            rois.append((i, np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], np.float32)))
    copies = [cv2.flip(img, 1) for img in images]  # OpenCV's mirror: not the code under test
    for size in (120, 224):
        got = crop_rois([mirror(img) for img in images], rois, size)
        want = crop_rois(copies, rois, size)
        np.testing.assert_array_equal(got, want)
        assert want.std() > 10
    assert all(np.array_equal(a, b) for a, b in zip(images, before))


@pytest.mark.parametrize("shape", [(217, 333), (640, 640), (50, 71)])
def test_device_resize_equals_opencv_inter_linear(shape):
    img = _images(1)[0]
    host = cv2.resize(img, shape[::-1]).astype(int)
    device = resize(torch.from_numpy(img.copy()).permute(2, 0, 1), *shape).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(host - device).max() <= 1


def _pil_without_exif(datas):
    """Stand-in for nvJPEG: decodes pixels as stored (nvJPEG ignores EXIF) to (3, H, W) tensors."""
    out = []
    for d in datas:
        rgb = np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
        out.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1))
    return out


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_the_device_as_pil_does(orientation):
    upright = Image.fromarray(_images(1)[0]).resize((90, 60))  # not square: a wrong rotation shows in the shape
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    upright.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    data = buf.getvalue()
    assert probe_jpeg(data, **LIMITS) == orientation
    [device] = decode_batch([data], device=CPU, gpu_decoder=_pil_without_exif, **LIMITS)
    expected = decode_image(data)  # PIL + ImageOps.exif_transpose
    np.testing.assert_array_equal(device.permute(1, 2, 0).numpy(), expected)


def test_only_clean_jpegs_go_to_the_gpu_and_every_fault_gets_the_cpu_reason():
    files = {**bad_files(), **awkward_good_files(), "plain.jpg": face_jpeg()}
    names = sorted(files)
    sent: list[bytes] = []

    def recording(datas):
        sent.extend(datas)
        return _pil_without_exif(datas)

    out = decode_batch([files[n] for n in names], device=CPU, gpu_decoder=recording, **LIMITS)
    sent_names = {n for n in names if files[n] in sent}
    assert sent_names == {"plain.jpg", "grey.jpg", "exif_rotated.jpg", "huge_exif.jpg"}
    for name, result in zip(names, out):
        if name in bad_files():
            with pytest.raises(DecodeError) as err:
                decode_image(files[name])
            assert isinstance(result, DecodeError) and result.reason == err.value.reason, name
        else:
            np.testing.assert_array_equal(result.permute(1, 2, 0).numpy(), decode_image(files[name]), err_msg=name)


def test_an_image_the_gpu_decoder_refuses_falls_back_to_the_cpu_decoder():
    datas = [face_jpeg(), face_jpeg()[:-1] + b"\xd9"]  # both clean JPEGs by the header
    out = decode_batch(datas, device=CPU, gpu_decoder=lambda ds: [None] * len(ds), **LIMITS)
    for result, data in zip(out, datas):
        np.testing.assert_array_equal(result.permute(1, 2, 0).numpy(), decode_image(data))


def _chain(precision: str) -> Chain:
    """The bundled chain with every model on its PyTorch backend (the GPU path's), on the CPU."""
    spec = load_catalog(ROOT / "catalog.yaml").detectors
    torch_backend = {"backend": "torch"}
    face = spec.face.model_copy(update={"options": {**spec.face.options, **torch_backend}, "precision": precision})
    landmarkers = tuple(s.model_copy(update={"precision": precision, "options": {**s.options, **torch_backend}})
                        for s in spec.landmarkers)
    return Chain(spec.model_copy(update={"face": face, "landmarkers": landmarkers}))


def _nme_between(a, b) -> np.ndarray:
    """Per face: mean point distance between two labellings / sqrt(w * h) of the first's points, in %."""
    out = []
    for fa, fb in zip(sum(a, []), sum(b, [])):
        size = np.sqrt(np.prod(fa.primary.points.max(0) - fa.primary.points.min(0)))
        out.append(100 * np.linalg.norm(fa.primary.points - fb.primary.points, axis=1).mean() / size)
    return np.array(out)


N_DEV = 16  # the host labels' AFLW2000-3D images; the scenes follow them


@pytest.fixture(scope="module")
def host_labels():
    images = _images(N_DEV)
    return images, label_images(_chain("fp32"), images, [False] * len(images))


def test_labelling_device_tensors_gives_the_host_landmarks(host_labels):
    images, host = host_labels
    device = label_images(_chain("fp32"), to_device(images, CPU), [False] * len(images))
    assert [len(f) for f in device] == [len(f) for f in host] and sum(len(f) for f in host) >= 25
    for fa, fb in zip(sum(host, []), sum(device, [])):
        np.testing.assert_allclose(fb.box.bbox, fa.box.bbox, atol=1.0)  # 1-grey-level letterbox differences
        assert fb.crop_rgb.shape == fa.crop_rgb.shape == (120, 120, 3)
    nme = _nme_between(host, device)
    # Measured: median 0.03%, 90% of faces under 0.2%; the rest are extreme poses where the refine
    # pass amplifies a one-level pixel difference (max ~2%).
    assert np.median(nme) < 0.1 and np.quantile(nme, 0.9) < 0.5, nme


def test_fp16_inference_keeps_landmarks_within_tolerance(host_labels):
    """On 4 of the AFLW2000-3D images and every scene (16 faces, half of the host's): the CPU has no fast
    fp16 kernels, so each fp16 face costs several fp32 ones; the tolerance is per face all the same."""
    images, host = host_labels
    some = [*range(4), *range(N_DEV, len(images))]
    images, host = [images[i] for i in some], [host[i] for i in some]
    half = label_images(_chain("fp16"), to_device(images, CPU), [False] * len(images))
    assert [len(f) for f in half] == [len(f) for f in host] and sum(len(f) for f in host) >= 12
    nme = _nme_between(host, half)
    assert np.median(nme) < 0.1 and np.quantile(nme, 0.9) < 0.5, nme


def test_decode_gpu_without_a_gpu_is_a_clear_error(tmp_path):
    from pipeline.gpu_decode import decode_device

    catalog = load_catalog(ROOT / "catalog.yaml")
    catalog = catalog.model_copy(update={"execution": catalog.execution.model_copy(update={"decode": "gpu"})})
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error is for machines without it")
    with pytest.raises(RuntimeError, match="execution.decode is 'gpu'"):
        decode_device(catalog)


def test_fan_heatmap_decoding_equals_face_alignments():
    from face_alignment.utils import get_preds_fromhm

    from pipeline.detect.fan import decode_heatmaps

    rng = np.random.default_rng(3)
    hm = rng.random((5, 68, 64, 64)).astype(np.float32)
    hm[0, :, 0, 5] = 5  # peaks on the border rows and columns: no quarter-cell step there
    hm[1, :, 63, 63] = 5
    hm[2, :, 10, 0] = 5
    centres = rng.uniform(100, 400, (5, 2))
    scales = rng.uniform(0.5, 2.5, 5)
    points, peaks = decode_heatmaps(torch.from_numpy(hm), torch.from_numpy(centres), torch.from_numpy(scales))
    for i in range(5):
        _, own_points, own_peaks = get_preds_fromhm(hm[i:i + 1].copy(), centres[i], scales[i])
        np.testing.assert_array_equal(points[i].numpy(), own_points[0])
        np.testing.assert_array_equal(peaks[i].numpy(), own_peaks[0])


def test_fan_on_device_tensors_gives_the_host_points(tmp_path):
    """FAN with random weights (the trained file cannot be had here): crops cut from device tensors
    equal the host crops within a grey level, so nearly every heatmap peak lands in the same cell."""
    from face_alignment.models import FAN

    from pipeline.detect.factory import build_landmarker
    from pipeline.detect.spec import DetectorSpec
    from pipeline.references import load_mat_reference
    from pipeline.weights import sha256_file

    path = tmp_path / "checkpoints" / "2DFAN4-11f355bf06.pth.tar"
    path.parent.mkdir()
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), path)
    fan = build_landmarker(DetectorSpec(name="fan", weights=path, sha256=sha256_file(path), device="cpu"))
    paths = sorted((DATA / "aflw2000-dev").glob("*.jpg"))[:6]
    images = [decode_image(p.read_bytes()) for p in paths]
    refs = [load_mat_reference(p.with_suffix(".mat"), image_height=img.shape[0]) for p, img in zip(paths, images)]
    boxes = [np.array([np.r_[r.landmarks_68.min(0), r.landmarks_68.max(0)]], np.float32) for r in refs]
    host, device = fan(images, boxes), fan(to_device(images, CPU), boxes)
    same = np.concatenate([(a[0].points == b[0].points).all(1) for a, b in zip(host, device)])
    assert same.mean() > 0.97, same.mean()  # measured: 99.3% of points identical


def test_precision_auto_is_fp16_only_for_torch_models_on_cuda():
    from pipeline.device import resolve_precision

    cuda = torch.device("cuda")  # a device object needs no GPU
    assert resolve_precision("auto", cuda) == "fp16"
    assert resolve_precision("auto", cuda, backend="onnxruntime") == "fp32"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="needs backend: torch"):
        resolve_precision("fp16", cuda, backend="onnxruntime")
