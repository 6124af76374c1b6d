"""The trainer-side half of the loader: the last pixel work of a batch, on the trainer's device.

A CPU worker hands its views over as bytes (a quarter of the floats' shared memory and host-to-device
copy); :class:`BatchDecoder` normalises them on the device (:func:`histotx.data.pixels.normalise`).

GPU-side JPEG decoding, when ``data.augment.decode_device`` is "cuda": on a node with few CPU cores per GPU,
decoding and colouring ten views per tile is what the loader workers cannot keep up with. With this option the
workers only read shards, draw every random number (crop geometry, colour parameters — from the same generator
as on CPU) and move the transcripts; the batch carries the tiles' JPEG bytes
(:class:`~histotx.data.pixels.PendingViews`). :class:`BatchDecoder` then decodes the whole batch at once with
``torchvision.io.decode_jpeg`` on the trainer's device and makes the views with the same operations and
parameters as the CPU path (:func:`histotx.data.pixels.render`). The trainer calls it on each batch and knows
nothing of what it does.
"""

from __future__ import annotations

import warnings

import torch

from histotx.batch import SSLBatch
from histotx.data.config import AugmentConfig
from histotx.data.pixels import normalise


class BatchDecoder:
    """Makes a batch's images on ``device``: the pending views decoded and made, or the workers' byte
    views normalised. Every batch of the loader goes through it before the model sees it."""

    def __init__(self, cfg: AugmentConfig, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(cfg.std, dtype=torch.float32, device=self.device)
        self.failed = 0  # tiles whose JPEG did not decode (made as a grey tile, with a warning)

    def decode(self, tiles: list) -> list[torch.Tensor]:
        """``[3, H, W]`` uint8 tiles on the device: JPEG bytes decoded in one batched call, pixels moved."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg = [i for i, t in enumerate(tiles) if isinstance(t, bytes)]
        data = [torch.frombuffer(bytearray(tiles[i]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device) if data else []
        except RuntimeError:  # one damaged tile fails the batched call: decode one by one
            decoded = [self._decode_one(d) for d in data]
        out = [t if isinstance(t, bytes) else t.to(self.device, non_blocking=True) for t in tiles]
        for i, image in zip(jpeg, decoded, strict=True):
            out[i] = image
        return out

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            # The worker checked the header (a tile of tile_px); only the scan can be damaged here.
            self.failed += 1
            warnings.warn(
                f"a JPEG tile did not decode on {self.device} ({exc}); its views are made from a mid-grey tile",
                RuntimeWarning,
                stacklevel=3,
            )
            import io

            w, h = Image.open(io.BytesIO(data.numpy().tobytes())).size
            return torch.full((3, h, w), 128, dtype=torch.uint8, device=self.device)

    def __call__(self, batch: SSLBatch) -> SSLBatch:
        pending = batch.pending
        if pending is None:
            batch.global_images = normalise(batch.global_images, self.mean, self.std)
            batch.local_images = normalise(batch.local_images, self.mean, self.std)
            return batch
        batch.global_images, batch.local_images = pending.render(self.decode(pending.tiles), self.mean, self.std)
        batch.pending = None
        return batch
