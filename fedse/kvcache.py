"""The acting KV cache: one row per running episode, kept across turns and shared by both policies.

Each row caches its episode's prompt window and grows by the tokens new since its last decision, so a turn
feeds tens of tokens instead of re-encoding the whole window. Rows are *places*: an episode that ends frees
its row and the next episode of the queue takes it (continuous batching), while the other rows keep their
keys and values. Rows of one batch differ in length, so every cached column carries a validity bit per row
(`KVRows.valid`) and every token its position (`position_ids`): a row can forget columns (a window that drops
old turns keeps only its head; a generated reply re-rendered from its parsed action keeps its common prefix)
without moving the others, and the holes are compacted away once they outnumber the real columns.

The keys and values live in buffers with spare columns (`GrowingLayer`): a decoding step writes its one new
column in place, where transformers' DynamicCache concatenates (a copy of the whole cache at every step).
StaticCache does not fit: it attends over its whole preallocated length and cannot grow, and its one write
position is shared by every row. The continuous-batching generator of transformers (paged attention) does not
fit either: it samples every row from one random stream (no per-episode noise), and the constrained policy
scores a tree of candidates with its own 4-D attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from fedse.envs.pool import Slot
from fedse.prompt import Rendered, prompt_tail


class GrowingLayer(DynamicLayer):
    """One layer's cached keys and values, [rows, heads, columns, dim], in buffers with spare columns.

    `update` writes the new columns in place (growing the buffers by half when full), `crop` only moves the
    end, and the model sees views of the used columns. Assigning `keys` or `values` replaces the buffer.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self.used = 0
        super().__init__(**kwargs)

    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._k is None else self._k[:, :, :self.used]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self.used = 0 if value is None or value.dim() < 4 else value.shape[2]

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        return None if self._v is None else self._v[:, :, :self.used]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._k = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[3]))
        self._v = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[3]))
        self.used = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any,
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.used + key_states.shape[2]
        self.reserve(end)
        assert self._k is not None and self._v is not None
        self._k[:, :, self.used:end] = key_states
        self._v[:, :, self.used:end] = value_states
        self.used = end
        return self._k[:, :, :end], self._v[:, :, :end]

    def get_seq_length(self) -> int:
        return self.used

    def crop(self, tokens_to_remove: int) -> None:
        self.used -= abs(tokens_to_remove)

    def reserve(self, columns: int) -> None:
        """Room for `columns` columns; new room is zeros (a masked key must still be finite: 0 · NaN is NaN)."""
        assert self._k is not None and self._v is not None
        if columns <= self._k.shape[2]:
            return
        room = columns + max(columns // 2, 32)
        self._k, self._v = (_widened(t, self.used, room) for t in (self._k, self._v))

    def take(self, rows: torch.Tensor, spare: int = 0) -> GrowingLayer:
        """A new layer holding copies of these rows' used columns, with room for `spare` more."""
        layer = GrowingLayer()
        assert self._k is not None and self._v is not None
        layer._k, layer._v = (_widened(t[rows.to(t.device)], self.used, self.used + spare)
                              for t in (self._k, self._v))
        layer.used, layer.device, layer.is_initialized = self.used, self.device, True
        return layer

    def put(self, rows: torch.Tensor, other: GrowingLayer, other_rows: torch.Tensor) -> None:
        """Write `other`'s rows `other_rows` into rows `rows` (their used columns; this layer grows to them)."""
        assert other._k is not None and other._v is not None and self._k is not None and self._v is not None
        self.reserve(other.used)
        self.used = max(self.used, other.used)
        rows, other_rows = rows.to(self._k.device), other_rows.to(other._k.device)
        self._k[rows, :, :other.used] = other._k[other_rows, :, :other.used]
        self._v[rows, :, :other.used] = other._v[other_rows, :, :other.used]

    def select(self, rows: torch.Tensor) -> None:
        assert self._k is not None and self._v is not None
        self._k, self._v = self._k[rows.to(self._k.device)], self._v[rows.to(self._v.device)]

    def add_rows(self, count: int) -> None:
        assert self._k is not None and self._v is not None
        self._k, self._v = (torch.cat([t, t.new_zeros((count, *t.shape[1:]))]) for t in (self._k, self._v))

    def gather_columns(self, order: torch.Tensor, spare: int) -> None:
        """Keep, per row, the columns `order[row]` (in that order) as the first ones."""
        assert self._k is not None and self._v is not None
        width = order.shape[1]
        index = order.to(self._k.device)[:, None, :, None]
        self._k, self._v = (_widened(t.gather(2, index.expand(-1, t.shape[1], -1, t.shape[3])), width, width + spare)
                            for t in (self._k, self._v))
        self.used = width


def _widened(t: torch.Tensor, used: int, room: int) -> torch.Tensor:
    """A zero buffer of `room` columns holding `t`'s first `used` columns."""
    out = t.new_zeros((t.shape[0], t.shape[1], room, t.shape[3]))
    out[:, :, :used] = t[:, :, :used]
    return out


def decoder(model: Any) -> Any:
    """The transformer body of a (PEFT-wrapped) causal LM: its forward returns the last hidden state only,
    which is all acting needs (asking the whole model for `output_hidden_states` keeps every layer's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


class KVRows:
    """A batch of cached rows: the layers' keys and values, which columns are real for each row (`valid`), and
    each row's next position id (`length`, its count of real columns)."""

    def __init__(self, rows: int = 0) -> None:
        self.cache: Cache | None = None
        self.valid = torch.zeros(rows, 0, dtype=torch.bool)
        self.length = [0] * rows

    @property
    def rows(self) -> int:
        return len(self.length)

    @property
    def width(self) -> int:
        return self.valid.shape[1]

    def layers(self) -> list[GrowingLayer]:
        return list(self.cache.layers) if self.cache is not None else []  # type: ignore[arg-type]

    def take(self, rows: list[int], spare: int = 0) -> KVRows:
        """Copies of these rows, as a batch of their own."""
        index = torch.tensor(rows, dtype=torch.long)
        part = KVRows()
        part.valid, part.length = self.valid[index], [self.length[i] for i in rows]
        if self.cache is not None:
            part.cache = Cache(layers=[layer.take(index, spare) for layer in self.layers()])
        return part

    def put(self, rows: list[int], part: KVRows, part_rows: list[int] | None = None) -> None:
        """Write `part`'s rows `part_rows` (all, by default) into rows `rows`, leaving the other rows as they are."""
        part_rows = list(range(part.rows)) if part_rows is None else part_rows
        index, source = torch.tensor(rows, dtype=torch.long), torch.tensor(part_rows, dtype=torch.long)
        width = max(self.width, part.width)
        self.valid = _padded(self.valid, width)
        self.valid[index] = _padded(part.valid[source], width)
        for i, j in zip(rows, part_rows, strict=True):
            self.length[i] = part.length[j]
        if part.cache is None:
            return
        if self.cache is None:
            self.cache = Cache(layers=[_blank(layer, self.rows) for layer in part.layers()])
        for mine, theirs in zip(self.layers(), part.layers(), strict=True):
            mine.put(index, theirs, source)

    def select(self, rows: list[int]) -> None:
        """Keep these rows, in this order."""
        index = torch.tensor(rows, dtype=torch.long)
        self.valid, self.length = self.valid[index], [self.length[i] for i in rows]
        for layer in self.layers():
            layer.select(index)

    def add_rows(self, count: int) -> None:
        """Append `count` empty rows."""
        self.valid = torch.cat([self.valid, torch.zeros(count, self.width, dtype=torch.bool)])
        self.length += [0] * count
        for layer in self.layers():
            layer.add_rows(count)

    def truncate(self, row: int, keep: int) -> None:
        """Row `row` keeps its first `keep` real columns and forgets the rest (positions go on from `keep`)."""
        columns = self.valid[row].nonzero().squeeze(1)[:keep]
        self.valid[row] = False
        self.valid[row, columns] = True
        self.length[row] = len(columns)

    def reserve(self, columns: int) -> None:
        for layer in self.layers():
            layer.reserve(columns)

    def compact(self, ratio: float, slack: int) -> None:
        """Drop the padding and forgotten columns once they outnumber the real ones by `ratio` (plus `slack`): a
        gather of the cached keys and values (positions live in `position_ids`, so moving columns changes
        nothing), far cheaper than attending over the holes at every later step or re-encoding the windows."""
        if self.cache is None or self.valid.numel() == 0:
            return
        width = int(self.valid.sum(1).max())
        if self.width <= ratio * width + slack:
            return
        order = torch.sort(~self.valid, dim=1, stable=True).indices[:, :width]  # real columns first, in order
        self.valid = self.valid.gather(1, order)
        for layer in self.layers():
            layer.gather_columns(order, slack)

    def mask(self, block: torch.Tensor, real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The additive 4-D attention mask [rows, 1, new, cached + new]: a real new token sees its row's valid
        cached columns, and within the new tokens what `block` [rows, new, new] allows; padding must see at
        least itself (a query with no key at all would give NaN, which would leak into the cache through V)."""
        allow = torch.cat([self.valid[:, None, :] & real[:, :, None], block], dim=2)
        mask = torch.zeros(allow.shape, dtype=dtype).masked_fill_(~allow, torch.finfo(dtype).min)
        return mask[:, None]

    def forward(self, agent: Any, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last hidden state of the new tokens [rows, new, d]; their keys and values join the cache
        (call `commit` with the real ones, or `crop` the columns that are not to stay)."""
        if self.cache is None:
            self.cache = Cache(layer_class_to_replicate=GrowingLayer)
        device = agent.device
        out = decoder(agent.model)(input_ids=ids.to(device), position_ids=pos.to(device),
                                   attention_mask=mask.to(device), cache=self.cache, use_cache=True)
        return out.last_hidden_state

    def commit(self, real: torch.Tensor) -> None:
        """The last forward's first `real.shape[1]` new columns stay, `real` [rows, new] saying which are real."""
        self.valid = torch.cat([self.valid, real], dim=1)
        self.length = [n + int(k) for n, k in zip(self.length, real.sum(1).tolist(), strict=True)]

    def crop(self, columns: int) -> None:
        """Forget the last forward's last `columns` columns (never committed)."""
        if self.cache is not None and columns:
            self.cache.crop(-columns)

    def feed(self, agent: Any, deltas: list[list[int]], dtype: torch.dtype) -> torch.Tensor:
        """Append each row's tokens (right-padded, causal) and return their last hidden states [rows, w, d]."""
        width = max(len(d) for d in deltas)
        ids = torch.full((self.rows, width), agent.tokenizer.pad_token_id or 0, dtype=torch.long)
        pos = torch.zeros((self.rows, width), dtype=torch.long)
        real = torch.zeros((self.rows, width), dtype=torch.bool)
        for i, delta in enumerate(deltas):
            n = len(delta)
            ids[i, :n] = torch.tensor(delta, dtype=torch.long)
            pos[i, :n] = torch.arange(self.length[i], self.length[i] + n)
            real[i, :n] = True
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        block = (causal & real[:, None, :] & real[:, :, None]) | torch.eye(width, dtype=torch.bool)
        hidden = self.forward(agent, ids, pos, self.mask(block, real, dtype))
        self.commit(real)
        return hidden


def _padded(valid: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([valid, torch.zeros(valid.shape[0], width - valid.shape[1], dtype=torch.bool)], dim=1)


def _blank(like: GrowingLayer, rows: int) -> GrowingLayer:
    layer = GrowingLayer()
    assert like._k is not None and like._v is not None
    layer._k, layer._v = (t.new_zeros((rows, *t.shape[1:3], t.shape[3])) for t in (like._k, like._v))
    layer.used, layer.device, layer.is_initialized = 0, like.device, True
    return layer


@dataclass
class Row:
    """What one place of the cache holds: its episode, and how far the cache has followed it."""

    slot: Slot
    rendered: Rendered = field(default_factory=Rendered)  # the episode's tokenised head and turns
    absorbed: int = 0  # history entries already in the cache (or pending)
    pending: list[int] = field(default_factory=list)  # the last reply's tokens still to feed
    dropped: int = 0  # turns the cached window leaves out
    restart: bool = True  # the next delta is the (re)fitted window, from `skip`
    skip: int = 0  # window tokens a restarting row still has cached (its head)
    head: bool = False  # whether the row's first cached tokens are its episode's head


class EpisodeCache:
    """The KV rows of the running episodes and, per row, the bookkeeping that turns an episode's history into
    the tokens its row still has to feed (`deltas`). Used by both policies; the constrained one ends a prompt
    with `Action: ` (its candidates follow), ReAct with the assistant header (it writes its own reply)."""

    compact_ratio = 2.0  # compact once the columns exceed ratio x the longest row's real tokens + slack
    compact_slack = 64

    def __init__(self, agent: Any, constrained: bool) -> None:
        self.agent = agent
        self.tail = prompt_tail(agent.renderer, constrained)
        self.dtype = next(p.dtype for p in agent.model.parameters())
        self.rows: list[Row] = []
        self.kv = KVRows()
        self.fresh: list[int] = []  # rows whose last delta was a (re)fitted window

    def align(self, slots: list[Slot]) -> list[int]:
        """The row of each slot: a running episode keeps its row; a new one takes the row of an episode that
        ended (else a new row), leaving the others' cache as it is; rows left empty are dropped. When no
        episode carries over, the cache starts afresh."""
        index = {id(row.slot): i for i, row in enumerate(self.rows)}
        places: list[int | None] = [index.get(id(s)) for s in slots]
        if all(p is None for p in places):
            self.rows, self.kv = [Row(s) for s in slots], KVRows(len(slots))
            return list(range(len(slots)))
        free = sorted(set(range(len(self.rows))) - set(places))
        new = [j for j, p in enumerate(places) if p is None]
        grow = max(0, len(new) - len(free))
        if grow:
            free += range(len(self.rows), len(self.rows) + grow)
            self.kv.add_rows(grow)
            self.rows += [Row(slots[0])] * grow  # placeholders, replaced below
        for j, place in zip(new, free, strict=False):
            self.rows[place] = Row(slots[j])
            self.kv.truncate(place, 0)
            places[j] = place
        empty = free[len(new):]
        if empty:
            keep = [i for i in range(len(self.rows)) if i not in set(empty)]
            self.kv.select(keep)
            self.rows = [self.rows[i] for i in keep]
            moved = {old: new_i for new_i, old in enumerate(keep)}
            places = [moved[p] for p in places if p is not None]
        return [p for p in places if p is not None]

    def windows_changed(self, windows: list[tuple[list[int], int]]) -> None:
        """Rows whose window now leaves out more old turns restart after their head (`restart_row`)."""
        if self.kv.cache is None:
            return
        for i, (window, dropped) in enumerate(windows):
            if dropped != self.rows[i].dropped:
                self.restart_row(i, window)

    def restart_row(self, i: int, window: list[int]) -> None:
        """Row i's window dropped old turns: forget its cached tokens except the head (system message and
        first observation), which sits at the same positions in every window and so keeps its keys and values;
        the rest of the new window is fed after it."""
        row = self.rows[i]
        head = row.rendered.head or []
        keep = len(head) if row.head and window[:len(head)] == head else 0
        self.kv.truncate(i, keep)
        row.skip, row.pending, row.restart = keep, [], True

    def deltas(self, windows: list[tuple[list[int], int]]) -> list[list[int]]:
        """Tokens each row needs appended before its next decision (everything since the last one)."""
        r = self.agent.renderer
        deltas = []
        self.fresh = []
        for i, row in enumerate(self.rows):
            if self.kv.cache is None or row.restart:
                window, skip = windows[i][0], row.skip if self.kv.cache is not None else 0
                head = row.rendered.head or []
                deltas.append(window[skip:])
                row.head = skip > 0 or window[:len(head)] == head
                row.dropped, row.restart, row.skip = windows[i][1], False, 0
                self.fresh.append(i)
                continue
            ids = list(row.pending)
            for j, (action, observation) in enumerate(row.slot.history[row.absorbed:]):
                if j > 0:  # an action this policy did not choose (a resumed slot): render it in full
                    content, close = r.reply(action)
                    ids += r.assistant_open() + content + close
                ids += r.user(observation)
            deltas.append(ids + self.tail)
        return deltas

    def prefill(self, deltas: list[list[int]]) -> list[list[int]]:
        """Feed the fresh rows' windows (a new episode, a refitted window) in a forward of their own, all but
        their last token, so that the other rows, which add a turn of tens of tokens, are not padded to a whole
        window's length; returns what each row still has to feed (at least one token). When every row is fresh
        (the first turn of a batch) nothing is split."""
        fresh = [i for i in self.fresh if len(deltas[i]) > 1]
        if not fresh or len(fresh) == len(self.rows):
            return deltas
        kept = any(self.kv.valid[i].any() for i in fresh)
        part = self.kv.take(fresh) if kept else KVRows(len(fresh))
        part.compact(1.0, 0)  # a restarting row kept its head only: attend over that, not its old columns
        part.feed(self.agent, [deltas[i][:-1] for i in fresh], self.dtype)
        self.kv.put(fresh, part)
        return [d[-1:] if i in set(fresh) else d for i, d in enumerate(deltas)]

    def decided(self, i: int, pending: list[int]) -> None:
        """Row i has acted: `pending` are its reply's tokens that are not yet in the cache."""
        row = self.rows[i]
        row.pending, row.absorbed = pending, len(row.slot.history)

    def compact(self) -> None:
        self.kv.compact(self.compact_ratio, self.compact_slack)
