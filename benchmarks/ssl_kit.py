"""Shared parts of benchmarks/ssl_reference.py and benchmarks/claims.py (CPU scale, the synthetic claims cohort).

- :func:`read_tiles`: a spot-tile shard set read once: whole tiles (uint8), keys, samples, patients, the target
  genes' log1p expression (histotx.eval.targets, as ``histotx eval`` computes it) and the region type at the
  spot (the cohort's truth);
- :func:`embed_images`: image-only CLS embeddings of a backbone on whole tiles;
- :func:`score`: the HEST-Bench ridge probe (patient folds, StandardScaler → PCA-256 → Ridge, alpha 100/(PCs ·
  genes)) scored both ways HEST users compare: the mean over folds of the per-fold Pearson (HEST-Bench's own),
  and the Pearson of the concatenated out-of-fold predictions; with PCA-256 on or off; per gene group; and the
  region-type linear probe;
- :func:`morphology_features`: handcrafted nucleus/texture features (colour deconvolution, Otsu, regionprops);
- :func:`train_supervised`: the same backbone trained with labels (region type or the expression targets):
  the stand-in foundation model and the supervised upper bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from histotx.eval import hestbench

REGIONS_KEY = "region"


@dataclass
class TileSet:
    images: np.ndarray  # [n, H, W, 3] uint8, whole tiles
    keys: list[str]
    samples: np.ndarray
    patients: np.ndarray
    Y: np.ndarray  # [n, targets] log1p expression (nan-free rows only)
    targets: list[str]
    region: np.ndarray  # region type at the tile centre (str)


def _truth_region(meta: dict, truth: dict) -> str:
    sites = np.asarray(truth["sites"]["xy_px"])
    half = meta["tile_px"] * meta["mpp"] / truth["mpp"] / 2
    centre = np.asarray(meta["origin_level0_px"]) + half
    nearest = int(np.argmin(((sites - centre) ** 2).sum(1)))
    return truth["regions"][truth["sites"]["region"][nearest]]


def read_tiles(shards: Path, cohort_dir: Path, targets: Sequence[str], cache: Path | None = None) -> TileSet:
    """Every tile with transcripts of a shard set (rows in the order of histotx.eval.targets)."""
    if cache is not None and cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return TileSet(
            z["images"], list(z["keys"]), z["samples"], z["patients"], z["Y"], list(z["targets"]), z["region"]
        )
    from histotx.data.stream import LoaderStats, read_shard
    from histotx.eval.targets import target_matrix, tile_expression
    from histotx.format import decode_image_rgb, decode_sample, read_manifest

    expr = tile_expression(shards)
    manifest = read_manifest(shards)
    images, metas = {}, {}
    stats = LoaderStats()
    for shard in manifest["shards"]:
        for raw in read_shard(str(Path(shards) / shard["name"]), stats):
            tile = decode_sample(raw)
            images[tile.key] = np.asarray(decode_image_rgb(tile.image))
            metas[tile.key] = tile.meta
    truths: dict[str, dict] = {}
    keys, samples, patients, ys, regions, imgs = [], [], [], [], [], []
    for sample, entry in expr.items():
        truth = truths.setdefault(sample, json.loads((cohort_dir / "truth" / f"{sample}.json").read_text()))
        y = target_matrix(entry, targets)
        for i, key in enumerate(entry.keys):
            keys.append(key)
            samples.append(sample)
            patients.append(entry.patient)
            ys.append(y[i])
            regions.append(_truth_region(metas[key], truth))
            imgs.append(images[key])
    out = TileSet(
        np.stack(imgs),
        keys,
        np.array(samples),
        np.array(patients),
        np.stack(ys).astype(np.float64),
        list(targets),
        np.array(regions),
    )
    if cache is not None:
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            images=out.images,
            keys=np.array(keys),
            samples=out.samples,
            patients=out.patients,
            Y=out.Y,
            targets=np.array(out.targets),
            region=out.region,
        )
        tmp.replace(cache)
    return out


def normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def embed_images(backbone, images: np.ndarray, mean, std, batch: int = 256) -> np.ndarray:
    """Image-only CLS of whole tiles (eval mode)."""
    was = backbone.training
    backbone.eval()
    out = []
    for i in range(0, len(images), batch):
        out.append(backbone(images=normalise(images[i : i + batch], mean, std)).cls.float().numpy())
    backbone.train(was)
    return np.concatenate(out)


def _pearson_cols(Y: np.ndarray, P: np.ndarray) -> np.ndarray:
    return hestbench.pearson_per_gene(Y, P)


def _fit_no_pca(X_train, Y_train, X_test, n_genes):
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X_train)
    alpha = hestbench.ridge_alpha(X_train.shape[1], n_genes)
    ridge = Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, max_iter=1000).fit(
        scaler.transform(X_train), Y_train
    )
    return ridge.predict(scaler.transform(X_test))


def score(
    X: np.ndarray,
    tiles: TileSet,
    groups: dict[str, list[str]],
    pca: bool = True,
    region_probe: bool = True,
) -> dict[str, float]:
    """HEST-Bench ridge probe, leave-one-patient-out; both scoring variants, per gene group; region probe."""
    X = np.asarray(X, dtype=np.float64)
    Y, patients = tiles.Y, tiles.patients
    folds = hestbench.patient_folds(patients)
    pred = np.zeros_like(Y)
    fold_r = []
    for train, test in folds:
        if pca:
            p, _ = hestbench.fit_predict(X[train], Y[train], X[test])
        else:
            p = _fit_no_pca(X[train], Y[train], X[test], Y.shape[1])
        pred[test] = p
        fold_r.append(_pearson_cols(Y[test], p))
    fold_r = np.array(fold_r)  # [folds, genes]
    concat_r = _pearson_cols(Y, pred)
    out = {
        "pearson_fold": float(np.nanmean(np.nanmean(fold_r, axis=1))),
        "pearson_concat": float(np.nanmean(concat_r)),
    }
    index = {g: i for i, g in enumerate(tiles.targets)}
    for name, genes in groups.items():
        cols = [index[g] for g in genes if g in index]
        if cols:
            out[f"{name}_fold"] = float(np.nanmean(np.nanmean(fold_r[:, cols], axis=1)))
            out[f"{name}_concat"] = float(np.nanmean(concat_r[cols]))
    if region_probe:
        res = hestbench.classification_probe(X, tiles.region, patients, folds, hestbench.SEED)
        out["region_bal_acc"] = float(np.mean(res.balanced_accuracy))
    return out


# ---------------------------------------------------------------- handcrafted features


def morphology_features(images: np.ndarray) -> np.ndarray:
    """Per tile: haematoxylin/eosin statistics, nucleus mask (Otsu on haematoxylin) cover, count, size, shape
    and spacing, and gradient texture: what a pathologist's eye reads as density, size, shape and texture."""
    from skimage.color import rgb2hed
    from skimage.filters import sobel, threshold_otsu
    from skimage.measure import label, regionprops

    hed = np.stack([rgb2hed(im) for im in images])  # [n, H, W, 3]
    threshold = threshold_otsu(hed[..., 0][:, ::2, ::2])  # one threshold for the whole set
    feats = []
    for im, h in zip(images, hed, strict=True):
        grey = im.mean(-1) / 255.0
        mask = h[..., 0] > threshold
        lab = label(mask)
        props = [p for p in regionprops(lab) if p.area >= 3]
        areas = np.array([p.area for p in props]) if props else np.zeros(1)
        ecc = np.array([p.eccentricity for p in props]) if props else np.zeros(1)
        solid = np.array([p.solidity for p in props]) if props else np.zeros(1)
        cents = np.array([p.centroid for p in props]) if len(props) > 1 else None
        if cents is not None:
            d = np.sqrt(((cents[:, None] - cents[None]) ** 2).sum(-1))
            np.fill_diagonal(d, np.inf)
            nn = d.min(1)
            nn_mean, nn_sd = nn.mean(), nn.std()
        else:
            nn_mean, nn_sd = float(im.shape[0]), 0.0
        g = sobel(grey)
        row = [
            *[f(h[..., c]) for c in range(3) for f in (np.mean, np.std)],
            *np.quantile(h[..., 0], [0.1, 0.5, 0.9]),
            mask.mean(),
            len(props),
            areas.mean(),
            areas.std(),
            np.median(areas),
            ecc.mean(),
            solid.mean(),
            nn_mean,
            nn_sd,
            g.mean(),
            g.std(),
            grey.std(),
            *im.reshape(-1, 3).mean(0) / 255.0,
        ]
        feats.append(row)
    return np.asarray(feats, dtype=np.float64)


# ---------------------------------------------------------------- supervised training


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flips and quarter turns per batch (the tiles have no orientation) and a mild brightness jitter."""
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-1)
    if torch.rand((), generator=g) < 0.5:
        x = x.flip(-2)
    x = torch.rot90(x, int(torch.randint(0, 4, (), generator=g)), dims=(-2, -1))
    return x * (1 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=g) - 0.5))


def train_supervised(
    backbone,
    images: np.ndarray,
    y: np.ndarray,
    mean,
    std,
    steps: int,
    seed: int,
    batch: int = 64,
    lr: float = 1e-3,
    classes: int = 0,
) -> list[float]:
    """Backbone + linear head on the CLS, AdamW with warm-up and cosine; ``classes`` > 0: cross-entropy on
    integer labels, else mean squared error on standardised targets. Returns the loss per step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    dim = backbone.config.embed_dim
    if classes:
        head = torch.nn.Linear(dim, classes)
        target = torch.as_tensor(y, dtype=torch.long)
    else:
        yt = torch.as_tensor(y, dtype=torch.float32)
        target = (yt - yt.mean(0)) / yt.std(0).clamp_min(1e-6)
        head = torch.nn.Linear(dim, target.shape[1])
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)

    def lr_at(t: int) -> float:
        return (
            lr * (t + 1) / warm if t < warm else lr * 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm)))
        )

    x_all = normalise(images, mean, std)
    backbone.train()
    losses = []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(t)
        idx = torch.randint(0, len(x_all), (batch,), generator=g)
        out = head(backbone(images=_augment(x_all[idx], g)).cls)
        if classes:
            loss = torch.nn.functional.cross_entropy(out, target[idx])
        else:
            loss = torch.nn.functional.mse_loss(out, target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        losses.append(float(loss.detach()))
    backbone.eval()
    return losses


def save_native(backbone, folder: Path, vocab_tsv: Path, mpp: float, mean, std, name: str) -> Path:
    """A backbone as HistoTx's export folder (what ``init.backbone`` and ``load_model`` read)."""
    from safetensors.torch import save

    from histotx.config import dump_config
    from histotx.export.native import FORMAT, VERSION
    from histotx.files import atomic_write_bytes, atomic_write_json
    from histotx.model.pretrained import NATIVE_CONFIG, NATIVE_META, NATIVE_WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in backbone.state_dict().items()}
    atomic_write_bytes(folder / NATIVE_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    dump_config(backbone.config, folder / NATIVE_CONFIG)
    atomic_write_bytes(folder / "vocab.tsv", Path(vocab_tsv).read_bytes())
    atomic_write_json(
        folder / NATIVE_META,
        {
            "format": FORMAT,
            "version": VERSION,
            "name": name,
            "mpp": mpp,
            "image_size": backbone.config.img_size,
            "mean": list(mean),
            "std": list(std),
            "genes": len(Path(vocab_tsv).read_text().splitlines()),
            "source": name,
            "step": 0,
        },
    )
    return folder


# ---------------------------------------------------------------- the stand-in foundation model


def model_from_config(config: Path, seed: int):
    """A FusedViT of a training config's architecture with seeded random weights, and the config."""
    from histotx.config import load_config
    from histotx.model import FusedViT
    from histotx.train.config import TrainConfig

    cfg = load_config(TrainConfig, config, [])
    torch.manual_seed(seed)
    return FusedViT(cfg.model_config()), cfg


def make_standin_fm(
    out: Path, tiles: TileSet, config: Path, vocab_tsv: Path, seed: int, steps: int = 600
) -> tuple[Path, list[float]]:
    """The stand-in pathology FM: the claims backbone trained to classify the region type at the spot on the
    pretraining patients' tiles (labels a pathologist gives; tissue types are what pathology FMs are known to
    separate), then exported as HistoTx's native folder. Skipped when ``out`` holds one already."""
    if (out / "teacher.safetensors").is_file():
        return out, []
    backbone, cfg = model_from_config(config, seed)
    classes, y = np.unique(tiles.region, return_inverse=True)
    a = cfg.data.augment
    losses = train_supervised(backbone, tiles.images, y, a.mean, a.std, steps, seed, classes=len(classes))
    save_native(backbone, out, vocab_tsv, 1.0, a.mean, a.std, f"stand-in FM (region-supervised, seed {seed})")
    return out, losses
