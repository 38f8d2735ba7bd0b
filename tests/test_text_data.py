"""Local text as data: `data=text` (files, folders, lists; clear errors before the model loads), and
`datasets`' local `text` builder through `data=c4 data.path=text data.data_files=...`, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import CONF, SMOKE, run_cli_in_process, run_dirs
from omegaconf import ListConfig, OmegaConf

from amq.config.check import check_settings
from amq.config.compose import build
from amq.data import corpora
from amq.data.corpora import EmbeddedWikiLee, HubDataset, TextFiles, TextSplits, read_lee_corpus
from amq.data.tokens import DOC_SEPARATOR
from amq.errors import ConfigError


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture
def texts(tmp_path: Path) -> dict[str, Path]:
    """A calibration file and a held-out file of real text (the Lee news corpus), one document per paragraph."""
    lee = read_lee_corpus()
    return {
        "calib": _write(tmp_path / "calib.txt", "\n\n".join(lee[:150]) + "\n"),
        "held": _write(tmp_path / "news.txt", "\n\n".join(lee[150:]) + "\n"),
    }


@pytest.fixture(scope="module")
def embedded() -> TextSplits:
    return EmbeddedWikiLee(cache_dir=os.environ["AMQ_CACHE_DIR"]).load()  # parsed once a session: its cache


def _embedded_calibration_file(folder: Path, embedded: TextSplits) -> Path:
    """data=wiki_lee's calibration documents as one text file, a blank line between documents."""
    return _write(folder / "wiki_calibration.txt", DOC_SEPARATOR.join(embedded.calibration) + "\n")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network here: asking whether the hub is reachable is itself the failure under test."""
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(corpora, "hub_reachable", lambda *a, **k: pytest.fail("a local dataset asked for the hub"))


# ---------------------------------------------------------------------------- TextFiles
def test_file_documents_are_blocks_between_blank_lines(tmp_path):
    calib = _write(tmp_path / "calib.txt", "\ufeffOne line\nwrapped.\r\n\r\n\n  \nTwo.\n\t\nThree\n")
    held = _write(tmp_path / "held.md", "Held out.\n")  # an explicit file is read whatever its extension
    splits = TextFiles(calibration=str(calib), heldout=str(held)).load()
    assert splits.calibration == ["One line\nwrapped.", "Two.", "Three"]
    assert splits.heldout == {"held": ["Held out."]}
    assert f"calibration {calib} (26 chars, 3 documents, sha256 " in splits.description
    assert f"held-out held: {held} (9 chars, 1 documents" in splits.description


def test_folder_reads_txt_files_recursively_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    for rel, text in {"b/z.txt": "bz", "a.txt": "a", "b/a.txt": "ba", "notes.md": "md", ".hidden/x.txt": "x", ".x.txt": "dot", "c.txt": " \n"}.items():
        _write(folder / rel, text)
    held = _write(tmp_path / "held.txt", "held")
    splits = TextFiles(calibration=str(folder), heldout=str(held)).load()
    assert splits.calibration == ["a", "ba", "bz"]  # c.txt is empty: skipped inside a folder
    assert f"calibration {folder}/ (4 *.txt files, 5 chars, 3 documents" in splits.description


def test_lists_and_heldout_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are relative to the working directory
    for rel in ("x/news.txt", "y/news.txt", "sports/1.txt", "calib.txt", "more/c.txt"):
        _write(tmp_path / rel, f"text of {rel}")
    data = TextFiles(calibration=["calib.txt", "more"], heldout=["x/news.txt", "y/news.txt", "sports"])
    splits = data.load()
    assert splits.calibration == ["text of calib.txt", "text of more/c.txt"]
    assert splits.heldout == {"news": ["text of x/news.txt"], "news_2": ["text of y/news.txt"], "sports": ["text of sports/1.txt"]}
    named = TextFiles(calibration="calib.txt", heldout={"wire": ["x/news.txt", "y/news.txt"], "sport": "sports"}).load()
    assert named.heldout == {"wire": ["text of x/news.txt", "text of y/news.txt"], "sport": ["text of sports/1.txt"]}
    assert str(tmp_path / "x" / "news.txt") in named.description


BAD = {
    "missing file": ("data.calibration", lambda t: {"calibration": str(t / "nope.txt")}, "nope.txt does not exist"),
    "empty file": ("data.calibration", lambda t: {"calibration": str(_write(t / "blank.txt", " \n\n\t\n"))}, "blank.txt has no text"),
    "folder without txt": ("data.calibration", lambda t: {"calibration": str(_write(t / "docs" / "a.md", "md").parent)}, "docs holds no *.txt files"),
    "folder of empty files": ("data.calibration", lambda t: {"calibration": str(_write(t / "e" / "a.txt", "\n").parent)}, "e has no text"),
    "not UTF-8": ("data.calibration", lambda t: {"calibration": str(_write(t / "bin.txt", b"\xff\xfe\x00\x81"))}, "bin.txt is not UTF-8 text"),
    "calibration unset": ("data.calibration", lambda t: {"calibration": None}, "not set"),
    "not a path": ("data.calibration", lambda t: {"calibration": 3}, "3 is not a path"),
    "empty list": ("data.calibration", lambda t: {"calibration": []}, "[] is not a path"),
    "held-out missing in a list": ("data.heldout", lambda t: {"heldout": [str(t / "held.txt"), str(t / "gone")]}, "gone does not exist"),
    "held-out unset": ("data.heldout", lambda t: {"heldout": None}, "not set"),
    "named held-out missing": ("data.heldout.wire", lambda t: {"heldout": {"wire": str(t / "gone.txt")}}, "gone.txt does not exist"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_paths_name_the_setting_and_the_path(case, tmp_path):
    setting, settings, problem = BAD[case]
    good = {"calibration": str(_write(tmp_path / "calib.txt", "calibration text")), "heldout": str(_write(tmp_path / "held.txt", "held-out text"))}
    with pytest.raises(ConfigError) as err:
        TextFiles(**{**good, **settings(tmp_path)})
    assert err.value.setting == setting
    assert str(err.value).startswith(f"{setting}: ") and problem in str(err.value) and "(valid: " in str(err.value)


def test_embedded_calibration_written_out_reads_back_as_the_same_documents(tmp_path, embedded, texts):
    """So the same text through data=text gives the same calibration tokens (and shares cached sensitivity tables)."""
    calib = _embedded_calibration_file(tmp_path, embedded)
    assert TextFiles(calibration=str(calib), heldout=str(texts["held"])).load().calibration == embedded.calibration


def test_config_declares_and_builds_text(compose_cfg, texts):
    cfg = compose_cfg(["data=text", f"data.calibration={texts['calib']}", f"data.heldout=[{texts['held']}]"])
    check_settings(cfg, CONF)
    data = build(cfg.data, "data")
    assert isinstance(data, TextFiles) and list(data.load().heldout) == ["news"]
    unset = compose_cfg(["data=text"])
    check_settings(unset, CONF)  # null is the "required" marker: not a type error
    with pytest.raises(ConfigError, match=r"^data\.calibration: not set"):
        build(unset.data, "data")
    with pytest.raises(ConfigError, match=r"^data\.heldout: .*absent\.txt does not exist"):
        build(compose_cfg(["data=text", f"data.calibration={texts['calib']}", "data.heldout=absent.txt"]).data, "data")


# ---------------------------------------------------------------------------- HubDataset, local builders
def _hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # not the user's cache


def _lines(path: Path) -> list[str]:
    """What `datasets`' text builder makes of a file (one row per line), blank rows dropped."""
    return [line for line in path.read_text().splitlines() if line.strip()]


def test_hub_dataset_local_text_builder_from_the_command_line(compose_cfg, texts, tmp_path, monkeypatch, no_hub):
    _hub_cache(tmp_path, monkeypatch)
    calib, held = texts["calib"], texts["held"]
    cfg = compose_cfg(["data=c4", "data.path=text", f"data.data_files={{train:'{calib}',validation:'{held}'}}"])
    check_settings(cfg, CONF)
    data = build(cfg.data, "data")  # Hydra hands data_files over as a DictConfig
    assert isinstance(data, HubDataset) and data.local and data.data_files == {"train": str(calib), "validation": str(held)}
    assert type(data.data_files) is dict
    splits = data.load()
    assert splits.calibration == _lines(calib) and splits.heldout == {"text": _lines(held)}
    assert str(calib) in splits.description


@pytest.mark.parametrize("files", ["list", "str"])
def test_hub_dataset_local_data_files_as_list_or_str(files, texts, tmp_path, monkeypatch, no_hub):
    _hub_cache(tmp_path, monkeypatch)
    calib, held = str(texts["calib"]), str(texts["held"])
    data_files = OmegaConf.create([calib, held]) if files == "list" else calib  # one "train" split of them all
    data = HubDataset("text", None, "train", "train", data_files=data_files, max_docs=None)
    assert data.data_files == ([calib, held] if files == "list" else calib) and not isinstance(data.data_files, ListConfig)
    expected = _lines(texts["calib"]) + (_lines(texts["held"]) if files == "list" else [])
    assert data.load().calibration == expected


def test_hub_dataset_missing_local_file_is_a_data_files_error(tmp_path, monkeypatch, no_hub):
    _hub_cache(tmp_path, monkeypatch)
    data = HubDataset("text", None, "train", "validation", data_files={"train": str(tmp_path / "gone.txt"), "validation": str(tmp_path / "gone.txt")})
    with pytest.raises(ConfigError, match=r"^data\.data_files: cannot read split 'train' .*gone\.txt"):
        data.load()


def test_hub_dataset_from_the_hub_still_needs_it(monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(corpora, "hub_reachable", lambda *a, **k: False)
    remote = [HubDataset("allenai/c4", None, "train", "validation"), HubDataset("text", None, "train", "train", data_files="https://example.org/a.txt")]
    for data in remote:
        assert not data.local
        with pytest.raises(ConfigError, match="needs the Hugging Face hub"):
            data.load()


# ---------------------------------------------------------------------------- the command line
def test_cli_missing_text_file_is_one_line_and_no_run_dir(tmp_path, texts, monkeypatch, capfd):
    out = tmp_path / "out"
    proc = run_cli_in_process([*SMOKE, "data=text", f"data.calibration={tmp_path / 'missing.txt'}", f"data.heldout={texts['held']}"], out, monkeypatch, capfd)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].split("] - ", 1)[1].startswith("data.calibration: ") and str(tmp_path / "missing.txt") in lines[0], lines[0]
    assert run_dirs(out) == [], "a refused run left a directory behind"


@pytest.mark.slow
def test_cli_search_on_local_text(tmp_path, texts, embedded, monkeypatch, capfd):
    # The embedded calibration text, written out: the same calibration tokens as the other smoke
    # runs, so the sensitivity table they measured is reused (any new text costs minutes of it on CPU);
    # one search iteration is enough to show the data path works end to end.
    calib, out = _embedded_calibration_file(tmp_path, embedded), tmp_path / "out"
    proc = run_cli_in_process(
        [*SMOKE, "budget.iterations=1", "data=text", f"data.calibration={calib}", f"data.heldout={texts['held']}"], out, monkeypatch, capfd
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(out)
    data = json.loads((run_dir / "summary.json").read_text())["protocol"]["data"]
    assert f"calibration {calib} (" in data and f"{len(embedded.calibration)} documents" in data, data
    assert f"held-out news: {texts['held']} (" in data and "150 documents" in data, data
