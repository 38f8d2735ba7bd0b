"""Text corpora split into a calibration part (the search sees it) and a held-out part (it never does).

The embedded default reads real text that ships inside the `gensim` package: an excerpt of a 2016
English Wikipedia dump (parsed with gensim's own wiki parser) and the Lee news corpus. Nothing is
downloaded. Your own text files (`data=text`) are read directly, offline. Hub datasets (wikitext2, c4)
go through `datasets` and fail with a clear message offline; `datasets`' local builders (`text`,
`json`, `csv`, ...) reading local files, a local copy of a dataset's files, or a folder written by
`save_to_disk` need no hub. The `*_gptq` presets prepare the held-out text as GPTQ and the papers
that follow it do (amq.data.preparation).
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, ListConfig, OmegaConf

from amq.data.preparation import AMQ, HeldoutPreparation
from amq.data.preparation import preparation as named_preparation
from amq.data.tokens import DOC_SEPARATOR
from amq.errors import ConfigError
from amq.hub import hub_reachable, offline_mode
from amq.io import atomic_write_json

log = logging.getLogger(__name__)

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"


@dataclass(frozen=True)
class TextSplits:
    """Calibration and held-out documents, a description for the protocol record, and how the
    held-out documents become perplexity windows (a paper's rule holds one document: its text)."""

    calibration: list[str]
    heldout: dict[str, list[str]]
    description: str
    preparation: HeldoutPreparation = AMQ


class Corpus(Protocol):
    def load(self) -> TextSplits: ...


def keep_parsed(corpus: Corpus, cache_dir: str | Path) -> Corpus:
    """`corpus`, keeping what it parses (the embedded Wikipedia excerpt: about 2 s of gensim's parser
    a load) under `cache_dir` when its own `cache_dir` setting is null, as conf/data/ leaves it."""
    if getattr(corpus, "cache_dir", "") is None:
        corpus.cache_dir = str(cache_dir)
    return corpus


def plain(value: Any) -> Any:
    """OmegaConf containers (what Hydra passes) as plain dicts/lists: libraries read a DictConfig as a list of keys."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


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
    cache_dir: str | None = None  # parsed articles are kept here (parsing the dump takes seconds)

    def load(self) -> TextSplits:
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError("data.heldout_fraction", f"{self.heldout_fraction} is out of range", "0 < x < 1")
        wiki = _stable_order(self._articles())
        n_held = max(1, round(len(wiki) * self.heldout_fraction))
        calib, held = wiki[n_held:], wiki[:n_held]
        desc = f"gensim {WIKI_FILE}: {len(calib)} articles calibration / {len(held)} held-out (sha256 order); held-out also {LEE_FILE} (Lee news corpus)"
        log.info("data: %s", desc)
        return TextSplits(calibration=calib, heldout={"wiki": held, "lee": read_lee_corpus()}, description=desc)

    def _articles(self) -> list[str]:
        """The parsed articles, from the cache when this gensim file was parsed before."""
        if self.cache_dir is None:
            return read_wikipedia_excerpt()
        source = _gensim_test_data() / WIKI_FILE
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        path = Path(self.cache_dir) / "text" / f"wiki-excerpt-{digest}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            pass  # absent or damaged: parse again
        articles = read_wikipedia_excerpt()
        try:
            atomic_write_json(path, articles)
        except OSError as exc:  # a read-only cache only costs the parse
            log.warning("data: cannot cache the parsed articles in %s (%s)", path.parent, exc.strerror or exc)
        return articles


TEXT_GLOB = "*.txt"
_BLANK_LINES = re.compile(r"\n\s*\n")


def _paths_valid(setting: str) -> str:
    """What a path setting accepts, for the error line."""
    return f"a UTF-8 text file, a folder holding {TEXT_GLOB} files, or a list of them: {setting}=<path>"


def split_documents(text: str) -> list[str]:
    """A file's documents: its blocks of text between blank lines, stripped.

    The token stream joins documents with a blank line again (amq.data.tokens), so the calibration
    text is the file's text; the split only decides what counts as one document in the record.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [doc.strip() for doc in _BLANK_LINES.split(text) if doc.strip()]


@dataclass(frozen=True)
class TextSource:
    """One configured path (a file or a folder of text files) and the documents read from it."""

    path: Path
    folder: bool
    files: tuple[Path, ...]
    docs: tuple[str, ...]

    @property
    def chars(self) -> int:
        return sum(len(d) for d in self.docs)

    def describe(self) -> str:
        """Path, size and content hash: what the protocol record needs to tell two texts apart."""
        digest = hashlib.sha256(DOC_SEPARATOR.join(self.docs).encode("utf-8")).hexdigest()[:12]
        where = f"{self.path}/ ({len(self.files)} {TEXT_GLOB} files, " if self.folder else f"{self.path} ("
        return f"{where}{self.chars} chars, {len(self.docs)} documents, sha256 {digest})"


def _path_entries(setting: str, value: Any) -> list[str]:
    """The configured path(s) as a list of strings: a path, or a list of paths."""
    if value is None:
        raise ConfigError(setting, "not set (data=text needs it)", _paths_valid(setting))
    entries = value if isinstance(value, list) else [value]
    if not entries or not all(isinstance(e, str) and e.strip() for e in entries):
        raise ConfigError(setting, f"{value!r} is not a path or a list of paths", _paths_valid(setting))
    return entries


def _read_file(setting: str, path: Path) -> list[str]:
    try:
        return split_documents(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ConfigError(setting, f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", _paths_valid(setting)) from None
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {path} ({exc.strerror or exc})", _paths_valid(setting)) from None


def _text_files(setting: str, folder: Path) -> list[Path]:
    """Every *.txt file under `folder` in sorted order, skipping hidden files and folders (.git, checkpoints)."""
    relative = {p: p.relative_to(folder) for p in folder.rglob(TEXT_GLOB) if p.is_file()}
    files = sorted((p for p, rel in relative.items() if not any(part.startswith(".") for part in rel.parts)), key=lambda p: relative[p].as_posix())
    if not files:
        raise ConfigError(setting, f"folder {folder} holds no {TEXT_GLOB} files", _paths_valid(setting))
    return files


def _absolute(entry: str) -> Path:
    """`~` expanded and made absolute against the working directory, symlinks kept (their names name texts)."""
    return Path(os.path.abspath(os.path.expanduser(entry)))


def read_source(setting: str, entry: str) -> TextSource:
    """Read one configured path; a missing path, or one with no text, is an error naming `setting`."""
    path = _absolute(entry)
    folder = path.is_dir()
    if folder:
        files = _text_files(setting, path)
        per_file = {f: _read_file(setting, f) for f in files}
        empty = [f.name for f, docs in per_file.items() if not docs]
        if empty and len(empty) < len(files):
            log.warning("%s: skipping %d empty file(s) in %s: %s", setting, len(empty), path, ", ".join(empty[:5]))
        docs = [d for file_docs in per_file.values() for d in file_docs]
    elif path.is_file():
        files, docs = [path], _read_file(setting, path)
    else:
        raise ConfigError(setting, f"{path} does not exist", _paths_valid(setting))
    if not docs:
        raise ConfigError(setting, f"{path} has no text (empty or whitespace only)", _paths_valid(setting))
    return TextSource(path, folder, tuple(files), tuple(docs))


def _heldout_entries(value: Any) -> dict[str, tuple[str, list[str]]]:
    """Held-out texts: name -> (setting, paths); a mapping names them, else each path is one text named after its stem."""
    if isinstance(value, dict):
        if not value:
            raise ConfigError("data.heldout", "an empty mapping", "name: path, e.g. data.heldout={news:news.txt}")
        return {str(name): (f"data.heldout.{name}", _path_entries(f"data.heldout.{name}", paths)) for name, paths in value.items()}
    named: dict[str, tuple[str, list[str]]] = {}
    for entry in _path_entries("data.heldout", value):
        path = _absolute(entry)
        stem = (path.name if path.is_dir() else path.stem) or "heldout"
        name, n = stem, 1
        while name in named:  # news/a.txt and sports/a.txt: a, a_2
            n += 1
            name = f"{stem}_{n}"
        named[name] = ("data.heldout", [entry])
    return named


@dataclass
class TextFiles:
    """Your own text files, offline: calibration text, and held-out texts named after their files.

    Each setting is a file, a folder (every *.txt under it, recursively, sorted; hidden ones
    skipped), or a list of them; `heldout` may also map names to paths. A file's documents are its
    blocks of text between blank lines. Everything is read and checked when the config is built,
    so a bad path fails before the model loads.
    """

    calibration: str | list[str] | None = None
    heldout: str | list[str] | dict[str, str | list[str]] | None = None

    def __post_init__(self) -> None:
        self.calibration, self.heldout = plain(self.calibration), plain(self.heldout)
        self._calibration = [read_source("data.calibration", e) for e in _path_entries("data.calibration", self.calibration)]
        self._heldout = {name: [read_source(setting, e) for e in entries] for name, (setting, entries) in _heldout_entries(self.heldout).items()}
        calib_files = {f for src in self._calibration for f in src.files}
        for name, sources in self._heldout.items():
            shared = sorted(calib_files.intersection(f for src in sources for f in src.files))
            if shared:
                log.warning("data: held-out text %r shares %d file(s) with the calibration text (%s): it is not held out", name, len(shared), shared[0])

    def load(self) -> TextSplits:
        calib = "; ".join(src.describe() for src in self._calibration)
        held = "; ".join(f"{name}: " + "; ".join(src.describe() for src in sources) for name, sources in self._heldout.items())
        desc = f"text files (documents split at blank lines): calibration {calib}; held-out {held}"
        log.info("data: %s", desc)
        return TextSplits(
            calibration=[d for src in self._calibration for d in src.docs],
            heldout={name: [d for src in sources for d in src.docs] for name, sources in self._heldout.items()},
            description=desc,
        )


LOCAL_BUILDERS = frozenset({"text", "json", "csv", "parquet", "arrow", "pandas"})  # `datasets`' packaged readers


def _file_names(data_files: str | list | dict | None) -> list[str]:
    """Every file name or pattern in a `datasets` data_files value (a str, a list, or split -> str/list)."""
    if data_files is None:
        return []
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _file_names(v)]
    return [str(f) for f in data_files] if isinstance(data_files, list) else [str(data_files)]


def _saved_to_disk(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets`' save_to_disk (a DatasetDict or one Dataset)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


HUB_HELP = (
    "run once with network so `datasets` caches it (then HF_DATASETS_OFFLINE=1 reads that cache), "
    "or a local copy: data.path=<folder> (a save_to_disk folder, or the dataset's files); data=wiki_lee is embedded and offline"
)


@dataclass
class HubDataset:
    """A dataset from the Hugging Face hub (needs network on first use; cached by `datasets` after).

    `path` may also be one of `datasets`' local builders (`text`, `json`, `csv`, ...) or a local
    folder (a copy of the dataset's files, read with the same `data_files`, or a folder written by
    `save_to_disk`): then no hub is needed. Calibration documents are the split's non-empty rows
    (the first `max_docs`). `preparation` is how the held-out split becomes text
    (amq.data.preparation): `amq` keeps its non-empty rows (the first `max_docs`) as documents;
    `gptq_wikitext2` / `gptq_c4` build the one text GPTQ evaluates on.
    """

    path: str
    name: str | None
    calibration_split: str
    heldout_split: str
    text_field: str = "text"
    data_files: str | list | dict | None = None
    max_docs: int | None = 20000
    preparation: str = AMQ.name
    heldout_name: str | None = None  # the held-out text's name in the reports (None: the last part of `path`)

    def __post_init__(self) -> None:
        self.data_files = plain(self.data_files)
        self._preparation = named_preparation(self.preparation)

    @property
    def local(self) -> bool:
        """Whether `datasets` can read it without the hub: a local builder or folder, and no remote data file."""
        reader_is_local = self.path in LOCAL_BUILDERS or Path(self.path).expanduser().is_dir()
        return reader_is_local and not any("://" in f for f in _file_names(self.data_files))

    def _rows(self, split: str, count: int | None) -> list[str]:
        """The `text_field` of the split's first `count` rows (None: all), as stored."""
        local = self.local
        if not local and not offline_mode("dataset") and not hub_reachable():
            raise ConfigError("data", f"dataset {self.path!r} needs the Hugging Face hub, which is unreachable from here", HUB_HELP)
        try:
            ds = self._dataset(split)
        except Exception as exc:  # datasets raises many types for "offline"
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__
            if _saved_to_disk(Path(self.path).expanduser()):
                raise ConfigError("data.path", f"cannot read split {split!r} of {self.path} ({reason})", "a save_to_disk folder holding the split") from None
            if local:
                raise ConfigError(
                    "data.data_files",
                    f"cannot read split {split!r} of {self.path!r} from {self.data_files!r} ({reason})",
                    "existing local files, e.g. data.data_files={train:calib.txt,validation:heldout.txt}, or data=text",
                ) from None
            raise ConfigError(
                "data", f"cannot load dataset {self.path!r} split {split!r}: the dataset hub is unreachable or the dataset is not cached ({reason})", HUB_HELP
            ) from None
        if self.text_field not in ds.column_names:
            raise ConfigError("data.text_field", f"split {split!r} of {self.path!r} has no column {self.text_field!r}", ", ".join(ds.column_names))
        if count is not None and count < len(ds):
            ds = ds.select(range(count))
        return list(ds[self.text_field])

    def _dataset(self, split: str):
        import datasets

        folder = Path(self.path).expanduser()
        if folder.is_dir() and _saved_to_disk(folder):
            saved = datasets.load_from_disk(str(folder))
            if isinstance(saved, datasets.DatasetDict):
                if split not in saved:
                    raise KeyError(f"no split {split!r} in {folder} (it has {', '.join(saved)})")
                return saved[split]
            return saved
        return datasets.load_dataset(self.path, self.name, split=split, data_files=self.data_files)

    def _split(self, split: str) -> list[str]:
        """amq's documents: the non-empty rows among the first `max_docs`."""
        return [t for t in self._rows(split, self.max_docs) if t and t.strip()]

    def load(self) -> TextSplits:
        prep = self._preparation
        calib = self._split(self.calibration_split)
        held = [prep.text(self._rows(self.heldout_split, prep.rows))] if prep.joined else self._split(self.heldout_split)
        files = f" data_files={self.data_files}" if self.data_files else ""
        first = f"the first {self.max_docs} rows" if self.max_docs else "all rows"
        desc = (
            f"{self.path}/{self.name}{files}: calibration={self.calibration_split} (the non-empty rows among {first}, joined by blank lines; "
            f"seeded random windows), held-out={self.heldout_split} (preparation {prep.name}: {prep.text_rule})"
        )
        log.info("data: %s", desc)
        name = self.heldout_name or self.path.rstrip("/").split("/")[-1]
        return TextSplits(calibration=calib, heldout={name: held}, description=desc, preparation=prep)
