"""The synthetic gene panel and expression model: region programs, a crowding program, a hidden-state
program, NB counts.

Each cell expresses a base profile, multiplied up in the program of its region type (which the image
shows through nuclear density, size, shape and texture, never through mean colour), by
(local cell density / DENSITY_REF)^CROWDING_GAMMA in the crowding program (visible as how packed the
nuclei are) and by exp(β·hidden) in the hypoxia program (which the image does not show). Spots and
bins sum the rates of the cells they cover; counts are negative-binomial draws. ``GENE_GROUPS`` names
which genes an evaluation should score apart: what the image can tell (region, crowding) and what it
cannot (hidden).
Symbols and Ensembl ids are real human genes, so vocabularies built from this panel look like real ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from histotx.synth.tissue import REGIONS, Cells

# program → [(symbol, Ensembl id)]
PROGRAMS: dict[str, list[tuple[str, str]]] = {
    "housekeeping": [
        ("ACTB", "ENSG00000075624"),
        ("GAPDH", "ENSG00000111640"),
        ("B2M", "ENSG00000166710"),
        ("RPLP0", "ENSG00000089157"),
        ("RPS18", "ENSG00000231500"),
        ("EEF1A1", "ENSG00000156508"),
        ("TPT1", "ENSG00000133112"),
        ("MALAT1", "ENSG00000251562"),
        ("UBC", "ENSG00000150991"),
        ("PPIA", "ENSG00000196262"),
        ("TMSB4X", "ENSG00000205542"),
        ("FTL", "ENSG00000087086"),
    ],
    "tumour": [
        ("EPCAM", "ENSG00000119888"),
        ("KRT8", "ENSG00000170421"),
        ("KRT18", "ENSG00000111057"),
        ("KRT19", "ENSG00000171345"),
        ("CDH1", "ENSG00000039068"),
        ("ERBB2", "ENSG00000141736"),
        ("ESR1", "ENSG00000091831"),
        ("MKI67", "ENSG00000148773"),
        ("TOP2A", "ENSG00000131747"),
        ("CLDN4", "ENSG00000189143"),
        ("TACSTD2", "ENSG00000184292"),
        ("ELF3", "ENSG00000163435"),
    ],
    "stroma": [
        ("COL1A1", "ENSG00000108821"),
        ("COL1A2", "ENSG00000164692"),
        ("COL3A1", "ENSG00000168542"),
        ("DCN", "ENSG00000011465"),
        ("LUM", "ENSG00000139329"),
        ("VIM", "ENSG00000026025"),
        ("ACTA2", "ENSG00000107796"),
        ("FAP", "ENSG00000078098"),
        ("POSTN", "ENSG00000133110"),
        ("SPARC", "ENSG00000113140"),
        ("PDGFRB", "ENSG00000113721"),
        ("TAGLN", "ENSG00000149591"),
    ],
    "immune": [
        ("PTPRC", "ENSG00000081237"),
        ("CD3E", "ENSG00000198851"),
        ("CD3D", "ENSG00000167286"),
        ("CD8A", "ENSG00000153563"),
        ("CD4", "ENSG00000010610"),
        ("MS4A1", "ENSG00000156738"),
        ("CD19", "ENSG00000177455"),
        ("CD79A", "ENSG00000105369"),
        ("GZMB", "ENSG00000100453"),
        ("GZMA", "ENSG00000145649"),
        ("CCL5", "ENSG00000271503"),
        ("IL7R", "ENSG00000168685"),
    ],
    "vessel": [
        ("PECAM1", "ENSG00000261371"),
        ("VWF", "ENSG00000110799"),
        ("CDH5", "ENSG00000179776"),
        ("KDR", "ENSG00000128052"),
        ("CD34", "ENSG00000174059"),
        ("ENG", "ENSG00000106991"),
        ("EMCN", "ENSG00000164035"),
        ("PLVAP", "ENSG00000130300"),
        ("HBB", "ENSG00000244734"),
        ("HBA1", "ENSG00000206172"),
        ("ACKR1", "ENSG00000213088"),
        ("CLDN5", "ENSG00000184113"),
    ],
    "hypoxia": [  # the hidden-state program
        ("VEGFA", "ENSG00000112715"),
        ("CA9", "ENSG00000107159"),
        ("SLC2A1", "ENSG00000117394"),
        ("LDHA", "ENSG00000134333"),
        ("PGK1", "ENSG00000102144"),
        ("BNIP3", "ENSG00000176171"),
        ("NDRG1", "ENSG00000104419"),
        ("ADM", "ENSG00000148926"),
        ("ENO1", "ENSG00000074800"),
        ("P4HA1", "ENSG00000122884"),
        ("ANKRD37", "ENSG00000186352"),
        ("EGLN3", "ENSG00000129521"),
    ],
    "crowding": [  # rise with local cell density; weak, random region preferences
        ("SOX9", "ENSG00000125398"),
        ("CD44", "ENSG00000026508"),
        ("ZEB1", "ENSG00000148516"),
        ("SNAI1", "ENSG00000124216"),
        ("PCNA", "ENSG00000132646"),
        ("CDK1", "ENSG00000170312"),
        ("CCNB1", "ENSG00000134057"),
        ("TP53", "ENSG00000141510"),
        ("MYC", "ENSG00000136997"),
        ("EGFR", "ENSG00000146648"),
        ("KRT5", "ENSG00000186081"),
        ("KRT14", "ENSG00000186847"),
    ],
}
HIDDEN_PROGRAM = "hypoxia"
CROWDING_PROGRAM = "crowding"
REGION_PROGRAMS = REGIONS  # each region type has the program of its name
# Xenium measures a targeted panel: the first XENIUM_PER_PROGRAM genes of every program but housekeeping.
XENIUM_PER_PROGRAM = 7
XENIUM_CONTROLS = (
    [f"NegControlProbe_{i:05d}" for i in (2, 4, 9, 14, 19, 33, 35, 39, 42, 92)]
    + [f"NegControlCodeword_{i:04d}" for i in range(500, 505)]
    + [f"BLANK_{i:04d}" for i in (6, 13, 37, 69, 72, 120, 180, 257)]
    + [f"UnassignedCodeword_{i:04d}" for i in range(3)]
)
REGION_FOLD = 8.0  # a region's program genes are this many times higher there
HIDDEN_BETA = 2.5  # hypoxia genes scale by exp(β·(hidden − ½))
CROWDING_GAMMA = 1.0  # crowding genes scale by (density / DENSITY_REF)^γ
DENSITY_REF = 0.004  # cells per µm², about the cohort's mean
NB_SHAPE = 4.0  # negative binomial: gamma shape of the per-site rate (variance = μ + μ²/shape)


def gene_table() -> tuple[list[tuple[str, str]], list[str]]:
    """All genes as (symbol, Ensembl id), and each gene's program."""
    genes, program = [], []
    for name, members in PROGRAMS.items():
        genes += members
        program += [name] * len(members)
    return genes, program


def gene_groups() -> dict[str, list[str]]:
    """Gene symbols by what drives them: ``region`` (region programs, seen through morphology),
    ``crowding`` (local nuclei density), ``hidden`` (the hidden state, invisible), ``housekeeping``."""
    genes, program = gene_table()
    groups: dict[str, list[str]] = {"region": [], "crowding": [], "hidden": [], "housekeeping": []}
    for (symbol, _), p in zip(genes, program, strict=True):
        key = "region" if p in REGION_PROGRAMS else "hidden" if p == HIDDEN_PROGRAM else p
        groups[key].append(symbol)
    return groups


def xenium_panel() -> list[int]:
    """Indices (into gene_table) of the genes a Xenium panel targets."""
    _, program = gene_table()
    panel, seen = [], {}
    for i, p in enumerate(program):
        if p != "housekeeping" and seen.get(p, 0) < XENIUM_PER_PROGRAM:
            panel.append(i)
            seen[p] = seen.get(p, 0) + 1
    return panel


@dataclass
class ExpressionModel:
    genes: list[tuple[str, str]]
    program: list[str]
    base: np.ndarray  # (G,) molecules per cell before region / hidden effects
    loading: np.ndarray  # (n_regions, G) multiplicative region effect
    hidden_gene: np.ndarray  # (G,) bool

    @classmethod
    def random(cls, rng: np.random.Generator) -> "ExpressionModel":
        genes, program = gene_table()
        prog = np.array(program)
        base = np.where(prog == "housekeeping", rng.uniform(4.0, 12.0, len(genes)), rng.uniform(0.3, 1.2, len(genes)))
        loading = np.ones((len(REGIONS), len(genes)))
        for r, name in enumerate(REGIONS):
            loading[r, prog == name] = REGION_FOLD
        bg = prog == CROWDING_PROGRAM
        loading[:, bg] = np.exp(rng.normal(0.0, 0.5, (len(REGIONS), int(bg.sum()))))
        return cls(genes, program, base, loading, prog == HIDDEN_PROGRAM)

    def program_genes(self, name: str) -> list[str]:
        return [g[0] for g, p in zip(self.genes, self.program, strict=True) if p == name]

    def cell_rates(self, cells: Cells, patient_scale: np.ndarray | None = None) -> np.ndarray:
        """(n_cells, G) expected molecules per cell at full capture."""
        rates = self.base * self.loading[cells.region]
        rates = rates * np.exp(HIDDEN_BETA * (cells.hidden[:, None] - 0.5) * self.hidden_gene)
        crowded = np.array(self.program) == CROWDING_PROGRAM
        rates = rates * np.where(crowded, (cells.density[:, None] / DENSITY_REF) ** CROWDING_GAMMA, 1.0)
        if patient_scale is not None:
            rates = rates * patient_scale
        return rates.astype(np.float64)

    def patient_scale(self, rng: np.random.Generator) -> np.ndarray:
        """A mild per-patient gene-wise batch effect, so patient-stratified evaluation is not trivial."""
        return np.exp(rng.normal(0.0, 0.15, len(self.genes)))


def site_rates(weights: sp.spmatrix, cell_rates: np.ndarray, efficiency: float, ambient: np.ndarray) -> np.ndarray:
    """Expected counts per site: the weighted sum of the cells it covers, times capture efficiency, plus ambient."""
    return efficiency * np.asarray(weights @ cell_rates) + ambient


def negative_binomial(rng: np.random.Generator, mean: np.ndarray, shape: float = NB_SHAPE) -> sp.csr_matrix:
    """Gamma-Poisson counts with the given means, as int32 CSR."""
    lam = rng.gamma(shape, 1.0 / shape, mean.shape) * mean
    return sp.csr_matrix(rng.poisson(lam).astype(np.int32))


def coverage(site_xy_um: np.ndarray, cells: Cells, radius_um: float, sigma_um: float | None = None) -> sp.csr_matrix:
    """(n_sites, n_cells) weights of each cell's RNA in each site.

    A disk site (Visium spot) takes every cell whose centre lies within ``radius_um`` (weight 1). With
    ``sigma_um`` a small site (an HD bin) takes a Gaussian share of each cell's RNA, normalised so one
    cell's weights over a dense tiling of sites of that area sum to about 1 (``radius_um`` is then the
    site's side, used for its area).
    """
    from scipy.spatial import cKDTree

    n_sites, n_cells = len(site_xy_um), len(cells)
    if n_sites == 0 or n_cells == 0:
        return sp.csr_matrix((n_sites, n_cells))
    reach = radius_um if sigma_um is None else 3.0 * sigma_um
    pairs = cKDTree(site_xy_um).sparse_distance_matrix(cKDTree(cells.xy_um), reach, output_type="ndarray")
    if sigma_um is None:
        w = np.ones(len(pairs))
    else:
        w = radius_um**2 / (2 * np.pi * sigma_um**2) * np.exp(-0.5 * (pairs["v"] / sigma_um) ** 2)
    return sp.csr_matrix((w, (pairs["i"], pairs["j"])), shape=(n_sites, n_cells))
