"""The global gene vocabulary: stable integer ids for genes across cohorts, append-only.

A gene is identified by its Ensembl id when one is known, else by its symbol. Ids are never
re-assigned: a new cohort appends the genes it adds at the end, so shards written earlier stay valid.
Stored as ``vocab.tsv`` with the columns ``index``, ``symbol``, ``ensembl_id`` (empty when unknown).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from histotx.files import atomic_write_bytes
from histotx.format import MAX_VOCAB_BYTES, FormatError, read_regular

_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")


def is_ensembl_id(name: str) -> bool:
    return bool(_ENSEMBL.match(name))


class Vocab:
    def __init__(self) -> None:
        self.symbols: list[str] = []
        self.ensembl: list[str] = []
        self._by_ensembl: dict[str, int] = {}
        self._by_symbol: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.symbols)

    def _key_ensembl(self, ensembl_id: str) -> str:
        return ensembl_id.split(".")[0]

    def lookup(self, symbol: str, ensembl_id: str = "") -> int | None:
        if ensembl_id and is_ensembl_id(ensembl_id):
            idx = self._by_ensembl.get(self._key_ensembl(ensembl_id))
            if idx is not None:
                return idx
        if symbol and is_ensembl_id(symbol):
            idx = self._by_ensembl.get(self._key_ensembl(symbol))
            if idx is not None:
                return idx
        return self._by_symbol.get(symbol) if symbol else None

    def add(self, symbol: str, ensembl_id: str = "") -> int:
        """Id of the gene, appending it when new. A later Ensembl id fills in a symbol-only entry."""
        if not symbol and not ensembl_id:
            raise ValueError("a gene needs a symbol or an Ensembl id")
        if not ensembl_id and is_ensembl_id(symbol):
            symbol, ensembl_id = "", symbol
        idx = self.lookup(symbol, ensembl_id)
        if idx is None:
            idx = len(self.symbols)
            self.symbols.append(symbol)
            self.ensembl.append(ensembl_id)
        else:  # fill in what an earlier cohort did not know; the id itself never changes
            if ensembl_id and not self.ensembl[idx]:
                self.ensembl[idx] = ensembl_id
            if symbol and not self.symbols[idx]:
                self.symbols[idx] = symbol
        if ensembl_id:
            self._by_ensembl.setdefault(self._key_ensembl(ensembl_id), idx)
        if symbol:
            self._by_symbol.setdefault(symbol, idx)
        return idx

    def extend(self, genes: Iterable[tuple[str, str]]) -> list[int]:
        return [self.add(symbol, ensembl_id) for symbol, ensembl_id in genes]

    def name(self, idx: int) -> str:
        return self.symbols[idx] or self.ensembl[idx]

    def to_tsv(self) -> str:
        lines = ["index\tsymbol\tensembl_id"]
        lines += [f"{i}\t{s}\t{e}" for i, (s, e) in enumerate(zip(self.symbols, self.ensembl, strict=True))]
        return "\n".join(lines) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_bytes(path, self.to_tsv().encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocab":
        """Read ``vocab.tsv`` (untrusted: it travels with the shards). Every problem is a FormatError
        "file[:line]: problem": not a regular file, not UTF-8, a bad header, an index out of order, a gene
        with neither symbol nor Ensembl id, or a gene listed twice (same Ensembl id, or same symbol
        without Ensembl ids)."""
        return cls.from_bytes(read_regular(path, MAX_VOCAB_BYTES), str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "vocab.tsv") -> "Vocab":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return cls.parse(text, source)

    @classmethod
    def parse(cls, text: str, source: str = "vocab.tsv") -> "Vocab":
        vocab = cls()
        lines = text.splitlines()
        if not lines or lines[0].split("\t") != ["index", "symbol", "ensembl_id"]:
            raise FormatError(f"{source}: not a HistoTx vocabulary (header must be index, symbol, ensembl_id)")
        symbol_only: dict[str, int] = {}
        for n, line in enumerate(lines[1:], start=2):
            parts = line.split("\t")
            if len(parts) != 3 or parts[0] != str(len(vocab)):
                raise FormatError(
                    f"{source}:{n}: expected '{len(vocab)}<TAB>symbol<TAB>ensembl_id', got {line[:200]!r}"
                )
            symbol, ensembl = parts[1], parts[2]
            if not symbol and not ensembl:
                raise FormatError(f"{source}:{n}: gene {len(vocab)} has neither a symbol nor an Ensembl id")
            if ensembl:
                first = vocab._by_ensembl.get(vocab._key_ensembl(ensembl))
                if first is not None:
                    raise FormatError(f"{source}:{n}: Ensembl id {ensembl} is listed twice (also gene {first})")
            elif symbol in symbol_only:
                raise FormatError(f"{source}:{n}: gene {symbol} is listed twice (also gene {symbol_only[symbol]})")
            else:
                symbol_only[symbol] = len(vocab)
            vocab.symbols.append(symbol)
            vocab.ensembl.append(ensembl)
            if ensembl:
                vocab._by_ensembl.setdefault(vocab._key_ensembl(ensembl), len(vocab) - 1)
            if symbol:
                vocab._by_symbol.setdefault(symbol, len(vocab) - 1)
        return vocab

    @classmethod
    def load_or_new(cls, path: str | os.PathLike) -> "Vocab":
        return cls.load(path) if Path(path).exists() else cls()
