"""Write a run's text (calibration and held-out splits of `data=`) to plain files, for a machine
where the embedded corpora are not installed: `data=text data.calibration=<dir>/calibration.txt
data.heldout={wiki:<dir>/wiki.txt,lee:<dir>/lee.txt}` then reads the same documents (one per
block between blank lines).

    python scripts/dump_texts.py .gpu/text               # the default data (wiki_lee)
    python scripts/dump_texts.py .gpu/text data=wikitext2
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from amq.config.compose import CONF_DIR, build
from amq.data.corpora import keep_parsed
from amq.io import atomic_write_text


def _document(doc: str) -> str:
    """One document as one block: blank lines inside it would split it in two."""
    return "\n".join(line for line in doc.splitlines() if line.strip())


def main(out_dir: Path, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train_search", overrides=overrides)
    splits = keep_parsed(build(cfg.data, "data"), cfg.paths.cache_dir).load()
    parts = {"calibration": splits.calibration, **splits.heldout}
    for name, docs in parts.items():
        atomic_write_text(out_dir / f"{name}.txt", "\n\n".join(_document(d) for d in docs if d.strip()) + "\n")
        print(f"{out_dir / name}.txt: {len(docs)} documents")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/dump_texts.py OUT_DIR [HYDRA_OVERRIDES ...]")
    main(Path(sys.argv[1]), sys.argv[2:])
