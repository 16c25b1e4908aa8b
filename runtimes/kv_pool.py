"""The KV caches of a server's parallel slots on the `ort` backend, as rows of one buffer per layer.

Each layer's K and V live in one preallocated [slots, K, capacity + 1, E] buffer (BNSH); a state is a row. A
prompt runs batch 1 with row r bound as past/present (a pointer into the buffer: no copy, CPU or CUDA), and
`step` advances several states with one run of the batch-capable decoder_text: the rows lo..hi of the states
are bound as one [n, K, capacity + 1, E] tensor and GroupQueryAttention reads and writes each row at its own
seqlens_k. Rows in that range that sit the step out are fed a dummy token written just past the rows they hold
(at `capacity`, the spare row, when they are full), so what they hold is untouched. A busy row (a prefill writing it
on another thread: State.busy) is never bound: the step runs the spans of rows on either side of it.

A row is free when its state was released or is gone (weak references: a state dropped without `release`
gives its row back).
"""
from __future__ import annotations

import weakref

import numpy as np

from edgemm.errors import EdgemmError
from .base import State


def aligned_zeros(shape, dtype, align: int = 64) -> np.ndarray:
    """A zero-filled array whose data starts on an `align`-byte boundary, as ONNX Runtime's own CPU allocator aligns
    tensors (numpy's large arrays start 16 bytes past a page: the attention kernels then read the cache unaligned)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.zeros(n + align, np.uint8)
    off = -raw.ctypes.data % align
    return raw[off:off + n].view(dtype).reshape(shape)


class KVPool:
    def __init__(self, ort, dev: tuple, slots: int, n_layers: int, heads: int, capacity: int, head_dim: int,
                 dtype=np.float32):
        self.capacity, self.n_layers, self.dev, self.dtype = int(capacity), n_layers, dev, np.dtype(dtype)
        self.shape = (int(slots), heads, self.capacity + 1, head_dim)
        if dev[0] == "cpu":                 # numpy-backed: zero pages until written, readable in place
            self.arrays = [aligned_zeros(self.shape, self.dtype) for _ in range(2 * n_layers)]
            self.ptrs = [a.ctypes.data for a in self.arrays]
        else:
            self.arrays = None
            self._vals = [ort.OrtValue.ortvalue_from_shape_and_type(self.shape, self.dtype, *dev)
                          for _ in range(2 * n_layers)]
            self.ptrs = [v.data_ptr() for v in self._vals]
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self.owners: list = [None] * self.shape[0]      # row -> weakref to its State
        self._io: dict = {}                              # (first row, rows) -> the batched step's IOBinding

    def _owner(self, r: int):
        return self.owners[r]() if self.owners[r] is not None else None

    def take(self, max_len: int) -> State | None:
        """A free row as a new state (None when every row is taken or max_len exceeds the rows' capacity)."""
        if max_len > self.capacity:
            return None
        free = [r for r in range(self.shape[0]) if self._owner(r) is None]
        if not free:
            return None
        r = free[0]
        st = State(cache={"capacity": self.capacity, "row": r, "pool": self})
        if self.arrays is not None:         # views of the row (the layout new_state's arrays have)
            st.cache["arrays"] = [a[r:r + 1] for a in self.arrays]
        self.owners[r] = weakref.ref(st)
        return st

    def row(self, st: State) -> int:
        r = st.cache.get("row")
        if r is None or self._owner(r) is not st:
            raise EdgemmError("this KV cache was released; start a new state")
        return r

    def release(self, st: State) -> None:
        r = st.cache.get("row")
        if r is not None and self._owner(r) is st:
            self.owners[r] = None
        st.cache["row"] = None

    def bind(self, io, first: int, n: int) -> None:
        """Bind rows first..first+n of every layer as past_* and present_* (the same memory, in place)."""
        shape = [n, *self.shape[1:]]
        for i in range(self.n_layers):
            for j, kv in enumerate(("key", "value")):
                ptr = self.ptrs[2 * i + j] + first * self.row_bytes
                io.bind_input(f"past_{kv}.{i}", self.dev[0], self.dev[1], self.dtype, shape, ptr)
                io.bind_output(f"present_{kv}.{i}", self.dev[0], self.dev[1], self.dtype, shape, ptr)

    def step(self, sess, states: list, tokens: list[int], row_feeds: dict) -> list[np.ndarray]:
        """One decode step of every state (token i appended to state i) -> logits per state: one run, or one per
        span of rows between busy ones (State.busy)."""
        rows = [self.row(st) for st in states]
        if len(set(rows)) < len(rows):
            raise EdgemmError("decode_batch got the same state twice")
        busy = sorted(r for r in range(min(rows), max(rows)) if (o := self._owner(r)) is not None and o.busy)
        if not busy:
            return self._step(sess, states, tokens, row_feeds)
        out = {}
        for a, b in zip([-1] + busy, busy + [self.shape[0]]):      # the rows strictly between two busy ones
            span = [i for i, r in enumerate(rows) if a < r < b]
            if span:
                got = self._step(sess, [states[i] for i in span], [tokens[i] for i in span], row_feeds)
                out.update(zip(span, got))
        return [out[i] for i in range(len(states))]

    def _step(self, sess, states: list, tokens: list[int], row_feeds: dict) -> list[np.ndarray]:
        """One decode step of states whose rows span no busy row, in one run -> logits per state.
        row_feeds: other inputs of one row ([1, ...] arrays, the same every call), repeated for every row.
        As the single-state step does (OrtBackend._step), each span of rows keeps one binding whose CPU inputs are
        arrays updated in place and whose logits land in one preallocated buffer: a step allocates nothing."""
        rows = [self.row(st) for st in states]
        for st in states:
            if st.length + 1 > self.capacity:
                raise EdgemmError(f"KV cache full: {st.length} + 1 rows > capacity {self.capacity}")
        lo, n = min(rows), max(rows) + 1 - min(rows)
        f = self._io.get((lo, n))
        if f is None:
            io = sess.io_binding()
            arrs = {"input_ids": np.zeros((n, 1), np.int64), "positions": np.zeros((n, 1), np.int64),
                    "seqlens_k": np.zeros(n, np.int32), "total_sequence_length": np.zeros((), np.int32),
                    **{k: np.repeat(v, n, axis=0) for k, v in row_feeds.items()}}
            logits = np.zeros((n, sess.get_outputs()[0].shape[-1]), np.float32)
            io.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
            self.bind(io, lo, n)
            for name, arr in arrs.items():  # backed by these arrays: updated in place below
                io.bind_cpu_input(name, arr)
            f = self._io[(lo, n)] = (io, arrs, logits)
        io, arrs, logits = f
        ids, pos, seqlens = arrs["input_ids"], arrs["positions"], arrs["seqlens_k"]
        ids.fill(0)
        pos.fill(0)
        for r in range(lo, lo + n):         # rows sitting out: the dummy row goes past what they hold
            o = self._owner(r)
            seqlens[r - lo] = min(o.length, self.capacity) if o is not None else 0
        for st, r, t in zip(states, rows, tokens):
            ids[r - lo, 0], pos[r - lo, 0], seqlens[r - lo] = t, st.pos, st.length
        arrs["total_sequence_length"][...] = int(seqlens.max()) + 1
        sess.run_with_iobinding(io)
        for st in states:
            st.length += 1
            st.pos += 1
        return [logits[r - lo].copy() for r in rows]
