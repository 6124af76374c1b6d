"""The batched pixel stage: torchvision's colour operations with per-view parameters, and GPU-side decoding
(run here on CPU) giving the views the CPU loader gives, from the same draws."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
import torch
import torchvision.transforms.v2.functional as TF
from shardkit import random_grid, tile_sample
from skimage.color import hed_from_rgb, rgb_from_hed
from torchvision.io import decode_jpeg

from histotx.config import load_config
from histotx.data.augment import MultiCrop
from histotx.data.collate import SSLCollate
from histotx.data.config import DataConfig
from histotx.data.device_decode import BatchDecoder
from histotx.data.pixels import COLOUR_FIELDS, IDENTITY, colour, colour_hwc
from histotx.format import encode_image_rgb

OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def reference(image: torch.Tensor, p: np.ndarray, before_stain: list | None = None) -> torch.Tensor:
    """One view through torchvision's functional ops in float64, in DINOv2's order (the loader's former code);
    the image the stain jitter gets is appended to ``before_stain`` when given."""
    for i in p[4:8].astype(int):
        image = OPS[i](image, float(p[i]))
    if p[8]:
        if before_stain is not None:
            before_stain.append(image.clone())
        od = -torch.log(image.clamp_min(1e-6)).permute(1, 2, 0)
        stains = od @ torch.as_tensor(hed_from_rgb) * torch.as_tensor(p[9:12]) + torch.as_tensor(p[12:15])
        image = torch.exp(-(stains @ torch.as_tensor(rgb_from_hed))).permute(2, 0, 1).clamp(0.0, 1.0)
    if p[15]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if p[16]:
        kernel = 2 * math.ceil(3 * p[16]) + 1
        image = TF.gaussian_blur(image, [kernel, kernel], [float(p[16])] * 2)
    if p[17]:
        image = TF.solarize(image, 0.5)
    return image.clamp(0.0, 1.0)


def random_params(rng: np.random.Generator, n: int) -> np.ndarray:
    p = np.tile(np.array(IDENTITY), (n, 1))
    for row in p:
        if rng.random() < 0.8:
            row[0:4] = rng.uniform(0.7, 1.3, 3).tolist() + [rng.uniform(-0.1, 0.1)]
            row[4:8] = rng.permutation(4)
        if rng.random() < 0.5:
            row[8], row[9:12], row[12:15] = 1.0, rng.uniform(0.9, 1.1, 3), rng.uniform(-0.1, 0.1, 3)
        row[15] = rng.random() < 0.2
        row[16] = rng.uniform(0.1, 2.0) if rng.random() < 0.5 else 0.0
        row[17] = rng.random() < 0.3
    return p


def stain_amplification(before: torch.Tensor, p: np.ndarray) -> float:
    """How much the stain jitter can magnify an absolute error in its input: out_i = exp(Σ_j M_ij·log x_j + c_i)
    with out_i ≤ 1, so |∂out_i/∂x_j| ≤ |M_ij| / x_j; large where a channel is near 0 (a saturation step can
    leave one at 1e-6), where any float32 implementation drifts from the float64 reference."""
    matrix = np.einsum("ji,j,kj->ik", rgb_from_hed, p[9:12], hed_from_rgb)  # M_ij, output i, input j
    inverse = 1.0 / before.clamp_min(1e-6).numpy().reshape(3, -1)  # [3 inputs, pixels]
    return float((np.abs(matrix) @ inverse).max())


@pytest.mark.parametrize("kernels", ["torch", "opencv"])
def test_colour_ops_match_torchvision_view_by_view(kernels):
    """Per-view parameters = torchvision's ops one view at a time (float64 reference), for the batched torch
    ops (GPU path) and the CPU worker's OpenCV kernels. Both are float32: ~30 ops of gain ≤ 1.3 on values
    ≤ 1 leave them within 1e-4, except through the stain jitter's log, which magnifies an input error δ
    by :func:`stain_amplification`; δ ≤ 1e-6 (a few float32 roundings per op, HSV conversions included)."""
    rng = np.random.default_rng(0)
    views = torch.from_numpy(rng.uniform(0.02, 1.0, (24, 3, 40, 40)))
    views[:4, :, :8] = views[:4, 0:1, :8]  # grey pixels: hue undefined, must stay grey
    views[4:8, :, :8] = 1.0  # saturated white (clamps)
    p = random_params(rng, len(views))
    assert len(COLOUR_FIELDS) == p.shape[1]
    if kernels == "torch":
        got = colour(views.float().clone(), torch.from_numpy(p))
    else:
        got = [
            torch.from_numpy(colour_hwc(v.permute(1, 2, 0).float().numpy().copy(), row)).permute(2, 0, 1)
            for v, row in zip(views, p, strict=True)
        ]
    for v, row, out in zip(views, p, got, strict=True):
        before: list[torch.Tensor] = []
        expected = reference(v.clone(), row, before)
        tol = 1e-4 + (1e-6 * stain_amplification(before[0], row) if before else 0.0)
        torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)
    # identity parameters leave a view bit for bit
    if kernels == "torch":
        assert torch.equal(colour(views.float().clone(), torch.tensor([IDENTITY] * len(views))), views.float())
    else:
        for v in views:
            x = v.permute(1, 2, 0).float().numpy().copy()
            assert np.array_equal(colour_hwc(x.copy(), np.array(IDENTITY)), x)


def he_like_tile(rng: np.random.Generator, px: int = 96) -> np.ndarray:
    """Pink background with purple blobs: smooth, like an H&E tile (no near-black pixels)."""
    yy, xx = np.mgrid[:px, :px]
    rgb = np.zeros((px, px, 3)) + np.array([232.0, 180.0, 215.0])
    for cx, cy, r in rng.uniform([0, 0, 4], [px, px, 12], (12, 3)):
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = [110.0, 70.0, 160.0]
    return np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)


def test_gpu_decode_path_gives_the_cpu_views_from_the_same_draws():
    """decode_device "cuda", run here on CPU (torchvision.io.decode_jpeg on CPU): same sites, masks and
    modality draws as the CPU loader, and images equal up to the decoders' difference. Tolerance: the
    largest pixel difference between the two decoders on these tiles (d, in 1/255), times a bound on how
    much the colour chain can amplify it (brightness, contrast, saturation ≤ 1.4 each, hue ≤ 2, stain
    jitter ≤ 1.5 on pixels this bright, normalisation 1/min std), plus the CPU views' rounding to bytes
    (0.5/255 before normalisation) and float rounding."""
    overrides = [
        "augment.global_crop_size=64",
        "augment.local_crop_size=32",
        "augment.local_crops_number=3",
        "mask.patch_size=16",
        "collate.resolutions_um=[8]",
        "augment.color_jitter_p=1",
        "augment.hed_jitter_p=0.5",
    ]
    cpu_cfg = load_config(DataConfig, overrides=overrides)
    gpu_cfg = load_config(DataConfig, overrides=overrides + ["augment.decode_device=cuda"])
    rng = np.random.default_rng(3)
    tiles = []
    for i in range(6):
        t = tile_sample(rng, "s", i, tile_px=96, grid=random_grid(rng, 96))
        tiles.append(dataclasses.replace(t, image=encode_image_rgb(he_like_tile(rng)), image_ext="jpg"))
    tiles.append(tile_sample(rng, "s", 6, tile_px=96))  # a PNG tile: decoded by the worker either way

    def batch(cfg):
        crop = MultiCrop(cfg.augment)
        items = [crop(t, np.random.default_rng([7, i])) for i, t in enumerate(tiles)]
        return SSLCollate(cfg)(items, np.random.default_rng(11))

    cpu, pending = batch(cpu_cfg), batch(gpu_cfg)
    assert cpu.global_images.dtype == torch.uint8 and cpu.local_images.dtype == torch.uint8  # the workers' bytes
    cpu = BatchDecoder(cpu_cfg.augment, "cpu")(cpu)
    assert cpu.global_images.dtype == torch.float32 and cpu.local_images.dtype == torch.float32
    assert pending.pending is not None and pending.global_images.numel() == 0
    assert sum(isinstance(t, bytes) for t in pending.pending.tiles) == 6
    gpu = BatchDecoder(gpu_cfg.augment, "cpu")(pending)
    assert gpu.pending is None
    for name in ("image_mask", "transcript_mask", "modality", "transcript_index"):
        assert torch.equal(getattr(cpu, name), getattr(gpu, name)), name
    assert torch.equal(cpu.teacher_transcripts.lengths, gpu.teacher_transcripts.lengths)

    d = max(
        int(
            np.abs(
                simplejpeg.decode_jpeg(t.image).astype(int)
                - decode_jpeg(torch.frombuffer(bytearray(t.image), dtype=torch.uint8)).permute(1, 2, 0).numpy()
            ).max()
        )
        for t in tiles[:6]
    )
    gain = 1.4**3 * 2.0 * 1.5 / min(cpu_cfg.augment.std)
    tol = gain * d / 255 + 0.5 / 255 / min(cpu_cfg.augment.std) + 1e-4
    for a, b in ((cpu.global_images, gpu.global_images), (cpu.local_images, gpu.local_images)):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=tol, rtol=0)
    # the views are not trivially equal: jitter moved them away from the plain crops
    assert cpu.global_images.std() > 0.1


def test_gpu_decode_survives_a_damaged_scan():
    """A JPEG whose header is fine but whose scan is cut: the batch still decodes, that tile made grey."""
    rng = np.random.default_rng(0)
    good = encode_image_rgb(he_like_tile(rng))
    cut = good[: len(good) // 2]
    cfg = load_config(DataConfig, overrides=["augment.decode_device=cuda"]).augment
    decoder = BatchDecoder(cfg, "cpu")
    with pytest.warns(RuntimeWarning, match="did not decode"):
        out = decoder.decode([good, cut])
    assert out[0].shape == out[1].shape == (3, 96, 96) and decoder.failed == 1
    assert torch.equal(out[1], torch.full_like(out[1], 128))


def test_batched_resize_of_the_gpu_stage_is_the_per_view_resize():
    """resize_batched (two matmuls for all views, used on a GPU) = CropGeometry.apply_to_image view by view:
    within rounding of torch's float antialiased kernel (≤ 0.5 after rounding to integers), within one grey
    level of the CPU's uint8 kernel (fixed-point weights), through every flip and quarter turn."""
    from histotx.data.pixels import resize_batched
    from histotx.data.views import CropGeometry

    rng = np.random.default_rng(0)
    tiles = torch.from_numpy(rng.integers(0, 256, (3, 3, 64, 64), dtype=np.uint8))
    geometries = []
    for _ in range(8):  # crop-major: view k·3 + t of tile t
        for _ in range(3):
            w, h = (int(v) for v in rng.integers(10, 64, 2))  # down- and upsampled to 24 px
            geometries.append(
                CropGeometry(
                    int(rng.integers(0, 65 - w)),
                    int(rng.integers(0, 65 - h)),
                    w,
                    h,
                    24,
                    bool(rng.random() < 0.5),
                    bool(rng.random() < 0.5),
                    int(rng.integers(4)),
                )
            )
    got = resize_batched(tiles, geometries, 8)
    as_float = torch.stack([g.apply_to_image(tiles[i % 3].float()) for i, g in enumerate(geometries)])
    as_uint8 = torch.stack([g.apply_to_image(tiles[i % 3]) for i, g in enumerate(geometries)]).float()
    assert (got - as_float).abs().max() <= 0.5 + 1e-3
    assert (got - as_uint8).abs().max() <= 1.0


def test_byte_views_are_normalised_on_the_device_as_torchvision_normalises_floats():
    """A CPU worker's views (bytes, channels last) → (x / 255 − mean) / std in float32, memory format kept;
    float views (already normalised) pass through. Tolerance: a few float32 roundings of values ≤ 3."""
    from histotx.data.pixels import normalise

    cfg = load_config(DataConfig).augment
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
    images = torch.randint(0, 256, (5, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = images.permute(0, 3, 1, 2)  # [N, 3, S, S], channels last, as render_views hands them over
    got = normalise(images, mean, std)  # on a CPU: a table per channel
    assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
    want = TF.normalize(images.double() / 255.0, mean.double().tolist(), std.double().tolist())
    torch.testing.assert_close(got.double(), want, atol=3 * 4 * torch.finfo(torch.float32).eps, rtol=0)
    planar = normalise(images.contiguous(), mean, std)  # the arithmetic a GPU runs
    torch.testing.assert_close(planar.double(), want, atol=3 * 4 * torch.finfo(torch.float32).eps, rtol=0)
    assert normalise(got, mean, std) is got


_FORK_AFTER_PARALLEL_OPENCV = """
import multiprocessing, sys, time
import numpy as np
from histotx.data.pixels import render_views  # noqa: F401 (the data path's OpenCV, with its fork guard)
import cv2

def child(done):
    cv2.setNumThreads(1)  # what render_views does in a loader worker
    cv2.convertScaleAbs(np.ones((64, 64, 3), np.float32), alpha=255.0)
    done.put("ok")

if __name__ == "__main__":
    cv2.setNumThreads(2)
    image = np.random.default_rng(0).random((1500, 1500, 3), dtype=np.float32)
    cv2.resize(image, (700, 700), interpolation=cv2.INTER_AREA)  # the pool's threads start ...
    time.sleep(0.5)  # ... and fall asleep on their condition variables
    ctx = multiprocessing.get_context("fork")
    done = ctx.Queue()
    worker = ctx.Process(target=child, args=(done,))
    worker.start()
    worker.join(30)
    if worker.is_alive():
        worker.kill()
        sys.exit("the forked child hung in OpenCV")
    assert worker.exitcode == 0 and done.get(timeout=1) == "ok"
    assert cv2.getNumThreads() == 2  # the parent's setting is back
    cv2.resize(image, (700, 700), interpolation=cv2.INTER_AREA)
"""


def test_a_process_forked_after_parallel_opencv_work_can_use_opencv(tmp_path):
    """A loader worker forked from a process whose OpenCV pool has run (and gone to sleep) used to wait
    forever in ``cv2.setNumThreads`` (opencv/opencv#5150); seen as a hung `make test`."""
    script = tmp_path / "fork_after_opencv.py"
    script.write_text(_FORK_AFTER_PARALLEL_OPENCV)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
