"""Text corpora split into a calibration part (the search sees it) and a held-out part (it never does).

The embedded default reads real text that ships inside the `gensim` package: an excerpt of a 2016
English Wikipedia dump (parsed with gensim's own wiki parser) and the Lee news corpus. Nothing is
downloaded. Hub datasets (wikitext2, c4) go through `datasets` and fail with a clear message offline.
"""

from __future__ import annotations

import bz2
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from amq.errors import ConfigError
from amq.hub import hub_reachable, offline_mode

log = logging.getLogger(__name__)

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"


@dataclass(frozen=True)
class TextSplits:
    """Calibration and held-out documents, plus a description for the protocol record."""

    calibration: list[str]
    heldout: dict[str, list[str]]
    description: str


class Corpus(Protocol):
    def load(self) -> TextSplits: ...


def _gensim_test_data() -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as exc:  # pragma: no cover - gensim is a hard dependency
        raise ConfigError("data", "the embedded corpus needs gensim (pip install gensim==4.4.0)") from exc
    return Path(datapath(WIKI_FILE)).parent


def read_wikipedia_excerpt(min_chars: int = 500) -> list[str]:
    """Articles of gensim's Wikipedia excerpt as plain text (markup removed by gensim's parser)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_test_data() / WIKI_FILE, "rb") as fh:
        for title, text, _pageid in extract_pages(fh):
            if text.lower().startswith("#redirect"):
                continue
            plain = filter_wiki(text)
            paragraphs = [p.strip() for p in plain.split("\n") if len(p.strip()) > 40]
            body = "\n".join(paragraphs)
            if len(body) >= min_chars:
                articles.append(f"{title}\n{body}")
    return articles


def read_lee_corpus() -> list[str]:
    with open(_gensim_test_data() / LEE_FILE, encoding="latin-1") as fh:
        return [line.strip() for line in fh if line.strip()]


def _stable_order(docs: list[str]) -> list[str]:
    """A fixed pseudo-random order (by content hash) so the split doesn't follow dump order."""
    return sorted(docs, key=lambda d: hashlib.sha256(d.encode("utf-8")).hexdigest())


@dataclass
class EmbeddedWikiLee:
    """Wikipedia excerpt split into calibration/held-out; the Lee corpus is held-out only."""

    heldout_fraction: float = 0.3

    def load(self) -> TextSplits:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError("data.heldout_fraction", f"{self.heldout_fraction} is out of range", "0 < x < 1")
        wiki = _stable_order(read_wikipedia_excerpt())
        n_held = max(1, round(len(wiki) * self.heldout_fraction))
        calib, held = wiki[n_held:], wiki[:n_held]
        desc = (
            f"gensim {WIKI_FILE}: {len(calib)} articles calibration / {len(held)} held-out "
            f"(sha256 order); held-out also {LEE_FILE} (Lee news corpus)"
        )
        log.info("data: %s", desc)
        return TextSplits(calibration=calib, heldout={"wiki": held, "lee": read_lee_corpus()}, description=desc)


@dataclass
class HubDataset:
    """A dataset from the Hugging Face hub (needs network on first use; cached by `datasets` after)."""

    path: str
    name: str | None
    calibration_split: str
    heldout_split: str
    text_field: str = "text"
    data_files: dict | None = None
    max_docs: int | None = 20000

    def _split(self, split: str) -> list[str]:
        if not offline_mode("dataset") and not hub_reachable():
            raise ConfigError(
                "data",
                f"dataset {self.path!r} needs the Hugging Face hub, which is unreachable from here",
                "data=wiki_lee (embedded, offline), or HF_DATASETS_OFFLINE=1 to use a copy `datasets` cached earlier",
            )
        try:
            import datasets

            ds = datasets.load_dataset(self.path, self.name, split=split, data_files=self.data_files)
        except Exception as exc:  # datasets raises many types for "offline"
            raise ConfigError(
                "data",
                f"cannot load dataset {self.path!r} split {split!r}: the dataset hub is unreachable or the "
                f"dataset is not cached ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                "data=wiki_lee (embedded, offline), or run once with network so `datasets` caches it",
            ) from None
        rows = ds[self.text_field][: self.max_docs] if self.max_docs else ds[self.text_field]
        return [t for t in rows if t and t.strip()]

    def load(self) -> TextSplits:
        calib = self._split(self.calibration_split)
        held = self._split(self.heldout_split)
        desc = f"{self.path}/{self.name}: calibration={self.calibration_split}, held-out={self.heldout_split}"
        return TextSplits(calibration=calib, heldout={self.path.split("/")[-1]: held}, description=desc)
