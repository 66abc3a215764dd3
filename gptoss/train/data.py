"""Training data: harmony SFT conversations with a loss mask chosen per role/channel, plain text for continued
pretraining, packing several examples into one row (segment ids; positions restart per segment), and a
deterministic, resumable batch iterator whose position is two integers (epoch, row).

A row of length T holds next-token pairs: `inputs` [T], `targets` [T], `weights` [T] (1 where a target is
trained on), `positions` [T] (restart at 0 per segment, -1 on padding) and `segments` [T] (1, 2, ... per
packed example, 0 on padding)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from gptoss.harmony import render_with_spans

# Which assistant messages are trained on, by channel ("tool_calls": messages with a recipient).
LOSS_ON = ("final", "analysis", "commentary", "tool_calls")


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized example: tokens [n] and weights [n] (weights[i] = 1: predict tokens[i] from the ones before)."""

    tokens: np.ndarray
    weights: np.ndarray


def sft_example(conversation, tokenizer, loss_on: Sequence[str] = ("final",)) -> Example:
    """A harmony conversation (openai-harmony's JSON: {"messages": [...]}) rendered for training; the loss covers
    the assistant messages selected by `loss_on` (see LOSS_ON) through their terminator, from after the role name
    for the first assistant message of a turn (the completion prompt ends with `<|start|>assistant`) and from
    `<|start|>` for the later ones (the model writes those headers itself)."""
    bad = set(loss_on) - set(LOSS_ON)
    if bad:
        raise ValueError(f"loss_on: unknown choice(s) {sorted(bad)}; choose from {LOSS_ON}")
    rendered = render_with_spans(conversation, mode="training", auto_drop_analysis=False, tokenizer=tokenizer)
    tokens = np.asarray(rendered.tokens, np.int32)
    weights = np.zeros(len(tokens), np.float32)
    previous = None
    for span in rendered.spans:
        kind = "tool_calls" if span.recipient else span.channel
        if span.role == "assistant" and kind in loss_on:
            # The first assistant message of a turn starts after `<|start|>assistant` (the completion prompt ends
            # there); a later one of the same turn (final after analysis) includes its `<|start|>assistant`,
            # which the model must write itself after the previous message's <|end|>.
            first_of_turn = previous is None or previous.role != "assistant"
            start = span.start + 1 + len(tokenizer.encode_ordinary(span.role)) if first_of_turn else span.start
            weights[start:span.end] = 1.0
        previous = span
    if not weights.any():
        raise ValueError(f"conversation has no assistant message selected by loss_on={tuple(loss_on)}")
    return Example(tokens, weights)


def read_jsonl(path) -> list[dict]:
    """Rows of a JSONL file; a bad line is an error naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
    return rows


def sft_examples(path, tokenizer, loss_on: Sequence[str] = ("final",)) -> list[Example]:
    out = []
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            out.append(sft_example(row, tokenizer, loss_on))
        except ValueError as e:
            raise ValueError(f"{path}: conversation {n}: {e}") from None
    return out


def text_examples(texts: Iterable[str], tokenizer, seq_len: int) -> list[Example]:
    """Continued pretraining: documents joined by <|endoftext|>, cut into pieces of seq_len + 1 tokens."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode_ordinary(text) + [tokenizer.endoftext]
    n = seq_len + 1
    return [Example(np.asarray(stream[i:i + n], np.int32), np.ones(len(stream[i:i + n]), np.float32))
            for i in range(0, max(len(stream) - 1, 0), seq_len)]


def text_file_examples(path, tokenizer, seq_len: int, *, field: str = "text") -> list[Example]:
    """A .jsonl file (each row's `field`) or any other file as one plain-text document."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for n, row in enumerate(read_jsonl(path), 1):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise ValueError(f"{path}:{n}: expected an object with a string {field!r}")
            texts.append(row[field])
    else:
        texts = [path.read_text(encoding="utf-8")]
    return text_examples(texts, tokenizer, seq_len)


def pack(examples: Sequence[Example], seq_len: int, *, pad_id: int = 0, open_rows: int = 8) -> dict[str, np.ndarray]:
    """Packs examples into rows of seq_len next-token pairs (an example of n tokens takes n - 1 slots; one longer
    than a row is cut to seq_len + 1 tokens). First fit over the `open_rows` newest rows: an example goes to the
    first of them with room, else starts a new row (open_rows=1: strictly in order). Deterministic; returns arrays
    [rows, seq_len], rows in the order they were started, examples in a row in input order."""
    if open_rows < 1:
        raise ValueError(f"open_rows must be >= 1, got {open_rows}")
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used: list[int] = []
    for ex in examples:
        toks, w = ex.tokens[: seq_len + 1], ex.weights[: seq_len + 1]
        n = len(toks) - 1
        if n < 1:
            continue
        start = max(0, len(rows) - open_rows)
        r = next((i for i in range(start, len(rows)) if used[i] + n <= seq_len), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append((toks, w))
        used[r] += n
    out = {k: np.zeros((len(rows), seq_len), dt) for k, dt in
           (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32), ("positions", np.int32),
            ("segments", np.int32))}
    out["inputs"][:] = pad_id
    out["targets"][:] = pad_id
    out["positions"][:] = -1
    for r, row in enumerate(rows):
        at = 0
        for s, (toks, w) in enumerate(row, 1):
            n = len(toks) - 1
            out["inputs"][r, at:at + n] = toks[:-1]
            out["targets"][r, at:at + n] = toks[1:]
            out["weights"][r, at:at + n] = w[1:]
            out["positions"][r, at:at + n] = np.arange(n)
            out["segments"][r, at:at + n] = s
            at += n
    return out


@dataclasses.dataclass
class Batches:
    """Deterministic batches over examples: each epoch shuffles the examples with (seed, epoch), packs them and
    serves `batch_size` rows at a time (the last partial batch of an epoch is dropped). The position is
    (epoch, row): `state()` / `restore(state)` resume exactly."""

    examples: Sequence[Example]
    seq_len: int
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    epoch: int = 0
    row: int = 0

    def __post_init__(self):
        self._packed_epoch = None
        self._rows = None
        if not self.examples:
            raise ValueError("no training examples")
        if self.rows_per_epoch() < self.batch_size:
            raise ValueError(f"{len(self.examples)} examples pack into {self.rows_per_epoch()} rows of "
                             f"{self.seq_len} tokens, fewer than one batch of {self.batch_size}")

    def _epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        if self._packed_epoch != epoch:
            order = np.arange(len(self.examples))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._rows = pack([self.examples[i] for i in order], self.seq_len)
            self._packed_epoch = epoch
        return self._rows

    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows(self.epoch)["inputs"])

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "row": self.row}

    def restore(self, state: dict) -> Batches:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
        return self

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = self._epoch_rows(self.epoch)
        if self.row + self.batch_size > len(rows["inputs"]):
            self.epoch, self.row = self.epoch + 1, 0
            rows = self._epoch_rows(self.epoch)
        batch = {k: v[self.row:self.row + self.batch_size] for k, v in rows.items()}
        self.row += self.batch_size
        return batch
