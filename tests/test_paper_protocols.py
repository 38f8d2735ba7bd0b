"""The papers' perplexity protocols (data=wikitext2_gptq, data=c4_gptq): held-out windows token for
token as GPTQ's datautils.py (and the AMQ reference's amq/utils/data.py) cut them, read here from
local copies of the datasets built from the embedded text; the protocol recorded with the numbers;
offline, one clear line before any model loads.

The reference windows are computed as those scripts do, not through amq:
    enc = tokenizer(text, return_tensors="pt").input_ids[:, :cap * seqlen]
    n = enc.numel() // seqlen; windows = enc[:, :n * seqlen].reshape(n, seqlen)
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import CONF, SMOKE, run_cli_in_process, run_dirs

from amq.config.check import check_settings
from amq.config.compose import build
from amq.data import corpora
from amq.data.corpora import EmbeddedWikiLee, HubDataset
from amq.data.preparation import GPTQ_C4, GPTQ_WIKITEXT2
from amq.errors import ConfigError
from amq.evaluation.perplexity import PerplexityProtocol, perplexity_windows
from amq.evaluation.suite import EvalSuite
from amq.modeling.loading import EmbeddedGGUF


def gptq_windows(tokenizer, text: str, seqlen: int, cap: int | None = None) -> torch.Tensor:
    """GPTQ's / the AMQ reference's evaluation windows (get_wikitext2; get_c4_new with cap=256)."""
    enc = tokenizer(text, return_tensors="pt").input_ids
    if cap is not None:
        enc = enc[:, : cap * seqlen]
    n = enc.numel() // seqlen
    return enc[:, : n * seqlen].reshape(n, seqlen)


@pytest.fixture(scope="module")
def smollm2(compose_cfg):
    cfg = compose_cfg(["model=smollm2", *SMOKE])
    torch.set_num_threads(int(cfg.num_threads))
    cache = Path(cfg.paths.cache_dir)
    source = build(cfg.model.source, "model")
    return source.load(cache), source.converted_dir(cache)[0]


@pytest.fixture(scope="module")
def tokenizers(smollm2):
    """SmolLM2's tokenizer (adds no special tokens) and the same with BOS added, as Llama's does."""
    from transformers import AutoTokenizer

    lm, model_dir = smollm2
    with_bos = AutoTokenizer.from_pretrained(model_dir, add_bos_token=True)
    assert with_bos("a")["input_ids"][0] == with_bos.bos_token_id != lm.tokenizer("a")["input_ids"][0]
    return {"plain": lm.tokenizer, "bos": with_bos}


@pytest.fixture(scope="module")
def articles() -> list[str]:
    """The embedded Wikipedia articles (gensim's excerpt), title first (parsed once a session: its cache)."""
    splits = EmbeddedWikiLee(cache_dir=os.environ["AMQ_CACHE_DIR"]).load()
    return splits.calibration + splits.heldout["wiki"]


def wikitext_rows(articles: list[str]) -> list[str]:
    """Rows as wikitext-2-raw-v1 stores them: ' = Title = ', paragraphs, and empty rows between."""
    rows: list[str] = []
    for article in articles:
        title, *paragraphs = article.split("\n")
        rows += ["", f" = {title} = \n", ""]
        for p in paragraphs:
            rows += [f" {p} \n", ""]
    return rows


def _until(docs: list[str], chars: int) -> list[str]:
    """The first documents that together hold at least `chars` characters."""
    out: list[str] = []
    while sum(map(len, out)) < chars:
        out.append(docs[len(out)])
    return out


@pytest.fixture(scope="module")
def wikitext_copy(tmp_path_factory, articles) -> tuple[Path, dict[str, list[str]]]:
    """A local copy of WikiText-2 as `datasets`' save_to_disk writes it (train/validation/test)."""
    import datasets

    short = [a for a in articles if len(a) < 10_000]  # about 3 windows of 2048 tokens in the test split
    rows = {"train": wikitext_rows(short[:3]), "validation": wikitext_rows(short[3:4]), "test": wikitext_rows(_until(short[4:], 30_000))}
    folder = tmp_path_factory.mktemp("wikitext") / "wikitext-2-raw-v1"
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in rows.items()}).save_to_disk(str(folder))
    return folder, rows


@pytest.fixture(scope="module")
def c4_copy(tmp_path_factory, articles) -> tuple[Path, list[str]]:
    """A local copy of the two C4 shards the preset names (json lines, gzipped, C4's columns),
    one document per paragraph: more than GPTQ's 1100 validation documents."""
    docs = [p for a in articles for p in a.split("\n")[1:]]
    assert len(docs) > 1500
    folder = tmp_path_factory.mktemp("c4")
    for shard, rows in (("c4-train.00000-of-01024", docs[:300]), ("c4-validation.00000-of-00008", docs[300:])):
        path = folder / "en" / f"{shard}.json.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            for i, text in enumerate(rows):
                fh.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.org/{i}"}) + "\n")
    return folder, docs[300:]


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes its arrow cache for json files under the test's folder, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))


def _load(compose_cfg, preset: str, folder: Path):
    cfg = compose_cfg([f"data={preset}", f"data.path={folder}"])
    check_settings(cfg, CONF)
    return build(cfg.data, "data").load()


# ---------------------------------------------------------------------------- the windows
@pytest.mark.parametrize("tokenizer", ["plain", "bos"])
def test_wikitext2_windows_are_gptqs(compose_cfg, wikitext_copy, tokenizers, tokenizer):
    folder, rows = wikitext_copy
    tok = tokenizers[tokenizer]
    splits = _load(compose_cfg, "wikitext2_gptq", folder)
    text = "\n\n".join(rows["test"])  # every row, empty ones included
    assert splits.heldout == {"wikitext2": [text]} and splits.preparation is GPTQ_WIKITEXT2
    assert splits.calibration == [r for r in rows["train"] if r.strip()]  # amq's calibration documents
    expected = gptq_windows(tok, text, 2048)
    assert len(expected) >= 3
    for add_bos in (False, True):  # a model that wants BOS per window still gets the paper's windows
        got = perplexity_windows(tok, splits.heldout["wikitext2"], PerplexityProtocol(2048, None, add_bos), preparation=splits.preparation)
        assert torch.equal(got, expected)
    assert (got[:, 0] == tok.bos_token_id).sum() == (1 if tokenizer == "bos" else 0)  # BOS once, at the start of the text


def test_c4_windows_are_gptqs_first_1100_documents_and_256_windows(compose_cfg, c4_copy, tokenizers, datasets_cache):
    folder, validation = c4_copy
    tok = tokenizers["bos"]
    splits = _load(compose_cfg, "c4_gptq", folder)
    text = " ".join(validation[:1100])
    assert splits.heldout == {"c4": [text]} and splits.preparation is GPTQ_C4
    n_tokens = len(tok(text)["input_ids"])
    for seqlen in (512, 64):  # 512: fewer than 256 windows in 1100 documents; 64: the 256-window cap bites
        got = perplexity_windows(tok, splits.heldout["c4"], PerplexityProtocol(seqlen, None, True), preparation=splits.preparation)
        assert torch.equal(got, gptq_windows(tok, text, seqlen, cap=256))
        assert len(got) == min(256, n_tokens // seqlen)
    assert n_tokens // 512 < 256 < n_tokens // 64
    # a window cap of the run's own comes on top of the paper's
    assert len(perplexity_windows(tok, splits.heldout["c4"], PerplexityProtocol(64, 3, False), preparation=splits.preparation)) == 3


def test_protocol_is_recorded_with_the_numbers(compose_cfg, smollm2, wikitext_copy, tmp_path):
    lm, _ = smollm2
    folder, _ = wikitext_copy
    splits = _load(compose_cfg, "wikitext2_gptq", folder)
    paper = PerplexityProtocol(2048, None, lm.add_bos)
    suite = EvalSuite(dict(splits.heldout), splits.description, paper, cache_dir=tmp_path, preparation=splits.preparation)
    out = suite.run(lm.model, lm.tokenizer, "unquantized")
    proto, result = out["protocol"], out["perplexity"]["wikitext2"]
    assert "preparation gptq_wikitext2" in proto["data"] and "calibration=train" in proto["data"]
    ppl = proto["perplexity"]
    assert (ppl["window"], ppl["max_windows"], ppl["add_bos"], ppl["paper_protocol"]) == (2048, None, False, True)
    assert ppl["preparation"] == GPTQ_WIKITEXT2.describe() and ppl["preparation"]["special_tokens"].startswith("once")
    n = len(gptq_windows(lm.tokenizer, splits.heldout["wikitext2"][0], 2048))
    assert (result["windows"], result["tokens"]) == (n, n * 2047) and 1 < result["perplexity"] < 1000
    capped = EvalSuite(dict(splits.heldout), splits.description, PerplexityProtocol(256, 2, lm.add_bos), preparation=splits.preparation)
    assert capped.describe(lm.model)["perplexity"]["paper_protocol"] is False  # the record says when it is not the paper's


# ---------------------------------------------------------------------------- settings and offline
def test_unknown_preparation_names_the_valid_ones(compose_cfg):
    with pytest.raises(ConfigError, match=r"^data\.preparation: unknown held-out preparation 'gptq'.*amq, gptq_wikitext2, gptq_c4"):
        build(compose_cfg(["data=wikitext2", "data.preparation=gptq"]).data, "data")


@pytest.mark.parametrize("preset", ["wikitext2_gptq", "c4_gptq"])
@pytest.mark.parametrize("offline", ["HF_DATASETS_OFFLINE", "hub unreachable"])
def test_preset_offline_is_one_line_before_the_model_loads(preset, offline, tmp_path, monkeypatch, capfd):
    import datasets

    if offline == "HF_DATASETS_OFFLINE":  # `datasets` read its setting at import: set it there too
        env = {"HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    else:
        env = {}
        for flag in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            monkeypatch.delenv(flag, raising=False)
        monkeypatch.setattr(corpora, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(EmbeddedGGUF, "load", lambda *a, **k: pytest.fail("the model loaded before the data was read"))
    out = tmp_path / "out"
    proc = run_cli_in_process([*SMOKE, f"data={preset}"], out, monkeypatch, capfd, env_extra=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    line = errors[0].split("] - ", 1)[1]
    assert line.startswith("data: ") and ("wikitext" if preset.startswith("wiki") else "allenai/c4") in line, line
    assert "run once with network" in line and "data.path=<folder>" in line and "HF_DATASETS_OFFLINE=1" in line, line
    assert run_dirs(out) == [], "a refused run left a directory behind"


def test_preset_with_a_local_copy_needs_no_hub(compose_cfg, wikitext_copy, monkeypatch):
    monkeypatch.setattr(corpora, "hub_reachable", lambda *a, **k: pytest.fail("a local copy asked for the hub"))
    folder, _ = wikitext_copy
    data = build(compose_cfg(["data=wikitext2_gptq", f"data.path={folder}"]).data, "data")
    assert isinstance(data, HubDataset) and data.local
    with pytest.raises(ConfigError, match=r"^data\.path: cannot read split 'dev' of .*it has train, validation, test"):
        HubDataset(str(folder), None, "train", "dev").load()
