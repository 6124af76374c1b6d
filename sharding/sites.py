"""What every technology reader returns: measurement sites placed on the slide's level-0 pixels."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp


@dataclass
class Sites:
    """Spots (Visium), bins (Visium HD), molecules (Xenium) or HEST spots, in slide level-0 pixels.

    ``xy_px[i]`` is site i's centre as continuous (x, y) in level-0 pixels of the sample's slide, pixel
    (i, j) covering [i, i+1) × [j, j+1). 10x and HEST coordinates are taken as given (x = pxl_col,
    y = pxl_row), scaled when the slide is a hires/lowres image.
    ``counts`` is (n_sites × n_genes) CSR; ``genes[j]`` = (symbol, ensembl id or "") of column j.
    """

    xy_px: np.ndarray
    counts: sp.csr_matrix
    genes: list[tuple[str, str]]
    footprint_um: float
    footprint_shape: str  # disk | square | point
    panel: str = ""
    # Reasons → number of sites (or molecules) dropped while reading, e.g. {"not_in_tissue": 12}.
    dropped: dict[str, int] = field(default_factory=dict)
    # µm/px of the slide's level 0 as estimated from the data itself (e.g. the Visium spot lattice).
    mpp_estimate: float | None = None
    # Anything a reader wants the manifest to record (pixel size source, software version, ...).
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.xy_px = np.asarray(self.xy_px, dtype=np.float64).reshape(-1, 2)
        self.counts = sp.csr_matrix(self.counts)
        if self.counts.shape != (self.xy_px.shape[0], len(self.genes)):
            raise ValueError(
                f"counts shape {self.counts.shape} does not match {self.xy_px.shape[0]} sites × {len(self.genes)} genes"
            )

    @property
    def n_sites(self) -> int:
        return int(self.xy_px.shape[0])
