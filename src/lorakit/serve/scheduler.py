"""The running batch's key/value cache and the adapter slot table.

`PaddedBatch` keeps one transformers ``DynamicCache`` for all running rows, left-padded to a common
length T: row i's ``lengths[i]`` real positions sit at the right end, padding (masked out) at the left.
The requests admitted in one step are prefilled together as one left-padded batch; the rows that go on
join with one concatenation along the batch (their cache is padded, or the batch's is, to the longer of
the two). A finished row is dropped with an index select, and columns that are padding in every
remaining row are trimmed. Each row keeps its own positions, so a row's attention sees exactly its own
tokens, as if it ran alone.

`SlotTable` maps adapter keys to pool slots: hits reuse a slot, misses take a free slot or evict the least
recently used slot that no running row holds. Slot 0 (the base model) is never handed out.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F


class PaddedBatch:
    """Cache, lengths and slots of the running rows, in row order."""

    def __init__(self) -> None:
        self.cache = None  # transformers DynamicCache, or None while the batch is empty
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        """T, the padded cache length."""
        return 0 if self.cache is None else int(_layers(self.cache)[0].keys.shape[-2])

    def add(self, cache: object, lengths: list[int], rows: list[int] | None = None) -> None:
        """Append the rows of a left-padded prefill: ``cache`` (n, H, W, D) per layer, row i holding
        ``lengths[i]`` real positions at its right end; ``rows`` picks the rows of ``cache`` that join
        (in that order; None: all)."""
        layers = _layers(cache)
        trim = int(layers[0].keys.shape[-2]) - max(lengths)  # columns that are padding in every joining row
        if trim or (rows is not None and rows != list(range(int(layers[0].keys.shape[0])))):
            _select(cache, rows if rows is not None else list(range(len(lengths))), trim)
        if self.cache is None:
            self.cache, self.lengths = cache, list(lengths)
            return
        width, theirs_width = self.width, int(layers[0].keys.shape[-2])
        target = max(width, theirs_width)
        for mine, theirs in zip(_layers(self.cache), layers, strict=True):
            for attr in ("keys", "values"):
                old = _pad_left(getattr(mine, attr), target - width)
                new = _pad_left(getattr(theirs, attr), target - theirs_width)
                setattr(mine, attr, torch.cat([old, new], dim=0))
        self.lengths.extend(lengths)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current order), then trim all-padding columns."""
        if not rows:
            self.cache, self.lengths = None, []
            return
        if rows == list(range(len(self.lengths))):
            return
        self.lengths = [self.lengths[i] for i in rows]
        _select(self.cache, rows, self.width - max(self.lengths))

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention_mask (B, T + 1), position_ids (B, 1)) for one decoding step of every row."""
        width = self.width
        columns = torch.arange(width + 1)
        lengths = torch.tensor(self.lengths)
        mask = (columns[None, :] >= (width - lengths)[:, None]).long()
        return mask, lengths[:, None]

    def advance(self) -> None:
        """After a decoding step every row holds one more position."""
        self.lengths = [n + 1 for n in self.lengths]


def _layers(cache: object) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}: the engine needs a DynamicCache")
    return layers


def _select(cache: object, rows: list[int], trim: int) -> None:
    """Keep ``rows`` of every layer's keys and values and drop their first ``trim`` columns, in place."""
    index = torch.tensor(rows)
    for layer in _layers(cache):
        for attr in ("keys", "values"):
            tensor = getattr(layer, attr)
            kept = tensor.index_select(0, index.to(tensor.device))
            setattr(layer, attr, kept[:, :, trim:].contiguous())


def _pad_left(tensor: torch.Tensor, amount: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, amount + L, D), zeros in front."""
    return tensor if amount == 0 else F.pad(tensor, (0, 0, amount, 0))


class SlotTable:
    """Which adapter key sits in which slot (1..n), pins of running rows, LRU order of free-to-evict slots."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.key_of: dict[int, str] = {}
        self.slot_of: dict[str, int] = {}
        self.pins: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # loaded, unpinned, oldest first

    def lookup(self, key: str) -> int | None:
        return self.slot_of.get(key)

    def free_slot(self) -> tuple[int, str | None] | None:
        """A slot to load into: (slot, evicted key or None), or None when every slot is pinned."""
        for slot in range(1, self.n + 1):
            if slot not in self.key_of and slot not in self.pins:
                return slot, None
        if not self._idle:
            return None
        slot = next(iter(self._idle))
        return slot, self.key_of[slot]

    def assign(self, slot: int, key: str) -> None:
        old = self.key_of.pop(slot, None)
        if old is not None:
            del self.slot_of[old]
        self._idle.pop(slot, None)
        self.key_of[slot], self.slot_of[key] = key, slot
        self._idle[slot] = None

    def pin(self, slot: int) -> None:
        self.pins[slot] = self.pins.get(slot, 0) + 1
        self._idle.pop(slot, None)

    def unpin(self, slot: int) -> None:
        self.pins[slot] -= 1
        if self.pins[slot] == 0:
            del self.pins[slot]
            if slot in self.key_of:
                self._idle[slot] = None  # most recently used

    def forget(self, key: str) -> int | None:
        """Drop ``key``'s slot assignment (unloaded adapter); returns the slot if it is now free to clear."""
        slot = self.slot_of.pop(key, None)
        if slot is None:
            return None
        del self.key_of[slot]
        self._idle.pop(slot, None)
        return None if slot in self.pins else slot
