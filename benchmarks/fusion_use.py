"""Does a fused model's CLS use the transcript tokens? (issue 21, claim (b); CPU, the claims cohort)

For each model (a trained run's teacher and student, the stand-in FM, a random-init backbone) on a sample of
spot tiles of a claims shard set (the target genes dropped from the transcript input, as benchmarks/claims.py
embeds them: 16 µm tokens, one per Visium spot), in eval mode:

- **attention mass**: per block, the share of the CLS query's softmax attention (mean over heads and tiles) on
  the transcript tokens, on the image patches and on CLS + registers; with the share of the sequence the
  transcript tokens are (what uniform attention would give them);
- **CLS change**: median over tiles of ‖CLS(fused) − CLS(image)‖ / ‖CLS(image)‖ (what adding the transcripts
  moves), of ‖CLS(fused) − CLS(fused, another tile's transcripts)‖ / ‖CLS(fused)‖ (whether the CLS depends on
  *which* transcripts it gets), and the cosine of CLS(fused) with CLS(image) and with CLS(transcripts).

    python benchmarks/fusion_use.py --out out/claims --tag _d --seeds 0      # after claims.py --tag _d
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _tiles(shards: Path, n: int, seed: int):
    from histotx.data.stream import LoaderStats, read_shard
    from histotx.format import decode_sample, read_manifest

    out = []
    for entry in read_manifest(shards)["shards"]:
        for raw in read_shard(str(shards / entry["name"]), LoaderStats()):
            out.append(decode_sample(raw))
    idx = np.random.default_rng(seed).permutation(len(out))[:n]
    return [out[i] for i in sorted(idx)]


class _CLSAttention:
    """Forward hooks on every block's attention recording the CLS query's attention over its sequence."""

    def __init__(self, net) -> None:
        self.records: list[list[torch.Tensor]] = []
        self.handles = [b.attn.register_forward_hook(self._hook) for b in net.blocks]

    def _hook(self, module, args, _out) -> None:
        x, seq = args
        qkv = module.qkv(x).view(x.shape[0], 3, module.num_heads, module.head_dim)
        rows = []
        for part in seq.split(qkv):
            q, k = part[0, 0], part[:, 1]  # CLS query (heads, d); keys (n, heads, d)
            logits = torch.einsum("hd,nhd->hn", q, k) / module.head_dim**0.5
            rows.append(logits.softmax(-1).mean(0))  # (n,)
        self.records.append(rows)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def measure(loaded, tiles, drop_genes, shards: Path, batch: int = 64) -> dict:
    from histotx.batch import TranscriptBatch
    from histotx.eval import DEFAULT_RESOLUTION_UM
    from histotx.eval.embed import TileInputs, _input_genes

    net = loaded.model.eval()
    genes = _input_genes(shards, loaded, sorted(drop_genes))
    inputs = TileInputs(loaded.image_size, tuple(loaded.mean), tuple(loaded.std), DEFAULT_RESOLUTION_UM, genes)
    prefix = net.num_prefix_tokens
    layers = len(net.blocks)
    per_layer = {k: [[] for _ in range(layers)] for k in ("transcripts", "patches", "prefix", "uniform_transcripts")}
    cls = {"image": [], "fused": [], "shuffled": [], "transcripts": []}
    tokens = []
    for i in range(0, len(tiles), batch):
        chunk = [inputs(t) for t in tiles[i : i + batch]]
        keep = [j for j, (_, c) in enumerate(chunk) if c is not None and c.n_cells > 0]
        if len(keep) < 2:
            continue
        images = torch.stack([chunk[j][0] for j in keep])
        cells = [chunk[j][1] for j in keep]
        tx = TranscriptBatch.collate(cells)
        tokens.extend(tx.lengths.tolist())
        rolled = TranscriptBatch.collate(cells[1:] + cells[:1])
        hook = _CLSAttention(net)
        try:
            fused = net(images, transcripts=tx).cls
        finally:
            hook.close()
        n_patch = (images.shape[-2] // net.config.patch_size) * (images.shape[-1] // net.config.patch_size)
        for layer, rows in enumerate(hook.records):
            for b, a in enumerate(rows):
                n_tx = int(tx.lengths[b])
                per_layer["prefix"][layer].append(float(a[:prefix].sum()))
                per_layer["patches"][layer].append(float(a[prefix : prefix + n_patch].sum()))
                per_layer["transcripts"][layer].append(float(a[prefix + n_patch :].sum()))
                per_layer["uniform_transcripts"][layer].append(n_tx / (prefix + n_patch + n_tx))
        cls["fused"].append(fused)
        cls["image"].append(net(images).cls)
        cls["shuffled"].append(net(images, transcripts=rolled).cls)
        cls["transcripts"].append(net(None, transcripts=tx, image_hw=tuple(images.shape[-2:])).cls)
    c = {k: torch.cat(v) for k, v in cls.items()}
    mass = {k: [float(np.mean(v)) for v in rows] for k, rows in per_layer.items()}

    def rel(a, b):
        return float(((a - b).norm(dim=1) / b.norm(dim=1)).median())

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=1).median())

    return {
        "tiles": int(c["fused"].shape[0]),
        "transcript_tokens_per_tile": float(np.mean(tokens)),
        "cls_attention_per_block": mass,
        "fused_vs_image_rel": rel(c["fused"], c["image"]),
        "fused_vs_shuffled_rel": rel(c["fused"], c["shuffled"]),
        "cos_fused_image": cos(c["fused"], c["image"]),
        "cos_fused_transcripts": cos(c["fused"], c["transcripts"]),
    }


def main(argv: list[str] | None = None) -> int:
    import claims

    from histotx.export import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("out/claims"), help="claims.py's --out")
    p.add_argument("--tag", default="", help="claims.py's --tag (stage-2 runs in runs<TAG>/)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--split", choices=("val", "test"), default="val")
    p.add_argument("--tiles", type=int, default=512)
    p.add_argument("--json", type=Path, default=None, help="append one JSON line per model here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out.resolve()
    shards = out / "shards" / ("pretrain_fused" if args.split == "val" else "eval")
    targets, _ = claims.claims_targets()
    tiles = _tiles(shards, args.tiles, 0)
    rows = []
    for seed in args.seeds:
        run = out / f"runs{args.tag}" / f"histotx_s{seed}"
        models = {
            "histotx teacher": lambda run=run: load_model(run, which="teacher"),
            "histotx student": lambda run=run: load_model(run, which="student"),
            "FM": lambda seed=seed: load_model(out / "runs" / f"fm_s{seed}_export"),
            "random init": lambda seed=seed: claims.random_backbone(seed, shards),
        }
        for name, make in models.items():
            t0 = time.monotonic()
            res = measure(make(), tiles, targets, shards)
            row = {"seed": seed, "tag": args.tag, "split": args.split, "model": name, **res}
            rows.append(row)
            m = res["cls_attention_per_block"]
            print(
                f"seed {seed} {args.tag or '-'} {name:16s} CLS→transcripts per block "
                + " ".join(f"{t:.3f}" for t in m["transcripts"])
                + f" (uniform {m['uniform_transcripts'][0]:.3f}, {res['transcript_tokens_per_tile']:.1f} tokens)"
                + "; patches "
                + " ".join(f"{t:.3f}" for t in m["patches"])
                + f"; ‖fused−image‖/‖image‖ {res['fused_vs_image_rel']:.3f}; ‖fused−shuffled‖/‖fused‖ "
                f"{res['fused_vs_shuffled_rel']:.3f}; cos(fused, image) {res['cos_fused_image']:.3f}; "
                f"cos(fused, transcripts) {res['cos_fused_transcripts']:.3f} [{time.monotonic() - t0:.0f} s]",
                flush=True,
            )
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
