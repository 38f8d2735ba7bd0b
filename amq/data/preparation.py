"""How the rows of a held-out split become the token windows perplexity is measured on.

Perplexities are comparable only under one preparation: which rows, joined how, tokenized with
or without the tokenizer's special tokens, cut into which windows. amq's own rule (`amq`) suits
any text. The `gptq_*` rules reproduce how GPTQ (IST-DASLab/gptq, datautils.py: get_wikitext2,
get_c4_new) prepares its evaluation text, which AWQ and the AMQ reference (dlwns147/amq,
amq/utils/data.py) use as well, so amq's numbers can sit beside the papers' tables:

- WikiText-2: `"\\n\\n".join(test["text"])` over every row of wikitext-2-raw-v1's test split (empty
  rows included), tokenized once as `tokenizer(text)` does (the tokenizer's special tokens: BOS once
  at the start for Llama-style tokenizers), then `numel // seqlen` windows laid end to end.
- C4: `" ".join(validation[:1100]["text"])` of allenai/c4's en validation shard 00000-of-00008,
  tokenized the same way, of which the first `256 * seqlen` tokens are kept (at most 256 windows).

In the papers seqlen is 2048 and every window counts (`finalize.window=2048`,
`finalize.max_windows=null`, as `budget=paper` sets). Their windows carry no BOS of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from amq.errors import ConfigError

PAPER_WINDOW = 2048  # GPTQ's and the AMQ reference's seqlen


@dataclass(frozen=True)
class HeldoutPreparation:
    """One rule from split rows to windows; `describe()` is what the protocol record keeps."""

    name: str
    text_rule: str  # how the rows become text, in words, for the record
    join: str | None = None  # paper rules: the rows are joined with this into one text (None: amq's documents)
    rows: int | None = None  # paper rules: only the first `rows` rows (None: all)
    special_tokens: bool = False  # tokenized with the tokenizer's special tokens (once, around the whole text)
    window_bos: bool = True  # each window starts with BOS when the model wants it (amq); False: windows cut from the one stream
    max_windows: int | None = None  # at most this many windows (the first max_windows x window tokens)
    paper_window: int | None = None  # the window length of the protocol this rule reproduces

    @property
    def joined(self) -> bool:
        """Whether the rows become one text here (a paper rule) rather than amq's documents."""
        return self.join is not None

    def text(self, rows: Sequence[str]) -> str:
        """The paper's text: the first `rows` rows (all of them, empty ones included) joined by `join`."""
        if self.join is None:
            raise ValueError(f"{self.name} keeps documents, not one text")
        return self.join.join(rows[: self.rows] if self.rows is not None else rows)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "text": self.text_rule,
            "special_tokens": "once, as tokenizer(text) adds them" if self.special_tokens else "none",
            "window_bos": self.window_bos,
            "max_windows": self.max_windows,
        }

    def is_paper_protocol(self, window: int, max_windows: int | None) -> bool:
        """Whether a run with this window and window cap measures exactly the paper's numbers."""
        return self.paper_window is not None and window == self.paper_window and max_windows is None


AMQ = HeldoutPreparation("amq", "non-empty rows as documents, joined by blank lines")
GPTQ_WIKITEXT2 = HeldoutPreparation(
    "gptq_wikitext2",
    '"\\n\\n".join(every row of the split, empty rows included)',
    join="\n\n",
    special_tokens=True,
    window_bos=False,
    paper_window=PAPER_WINDOW,
)
GPTQ_C4 = HeldoutPreparation(
    "gptq_c4",
    '" ".join(the first 1100 rows of the split); the first 256 x window tokens',
    join=" ",
    rows=1100,
    special_tokens=True,
    window_bos=False,
    max_windows=256,
    paper_window=PAPER_WINDOW,
)
PREPARATIONS: dict[str, HeldoutPreparation] = {p.name: p for p in (AMQ, GPTQ_WIKITEXT2, GPTQ_C4)}


def preparation(name: str, setting: str = "data.preparation") -> HeldoutPreparation:
    """The named rule; an unknown name is a ConfigError naming `setting` and the valid names."""
    if name not in PREPARATIONS:
        raise ConfigError(setting, f"unknown held-out preparation {name!r}", ", ".join(PREPARATIONS))
    return PREPARATIONS[name]
