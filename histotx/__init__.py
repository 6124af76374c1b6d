"""HistoTx: early-fusion pretraining of H&E whole-slide images and spatial transcriptomics."""

__version__ = "0.1.0"
