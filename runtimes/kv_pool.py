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

The pool is sized to need (the first state's rows) and grows when a state needs more (`grow`: new buffers, every
row copied, every binding made again): runs that bind its memory hold `using()`, and `grow` waits for them, so a
prefill on serve's side worker never writes into a buffer that is being replaced.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

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
        self.n_layers, self.dev, self.dtype, self._ort = n_layers, dev, np.dtype(dtype), ort
        self.owners: list = [None] * int(slots)         # row -> weakref to its State
        self._cv, self._users, self._growing = threading.Condition(), 0, False
        self._alloc(int(slots), heads, int(capacity), head_dim)

    def _alloc(self, slots: int, heads: int, capacity: int, head_dim: int, old=None) -> None:
        """The buffers [slots, heads, capacity + 1, head_dim] per layer's K and V (old: host copies of the previous
        ones, whose rows are copied in)."""
        self.capacity = capacity
        self.shape = (slots, heads, capacity + 1, head_dim)
        if self.dev[0] == "cpu":            # numpy-backed: zero pages until written, readable in place
            self.arrays = [aligned_zeros(self.shape, self.dtype) for _ in range(2 * self.n_layers)]
            for a, b in zip(self.arrays, old or ()):
                a[:, :, : b.shape[2]] = b
            self.ptrs = [a.ctypes.data for a in self.arrays]
        else:
            self.arrays = None
            if old is None:
                self._vals = [self._ort.OrtValue.ortvalue_from_shape_and_type(self.shape, self.dtype, *self.dev)
                              for _ in range(2 * self.n_layers)]
            else:                           # (a grown pool on the device: its rows through the host, once)
                self._vals = []
                for b in old:
                    host = np.zeros(self.shape, self.dtype)
                    host[:, :, : b.shape[2]] = b
                    self._vals.append(self._ort.OrtValue.ortvalue_from_numpy(host, *self.dev))
            self.ptrs = [v.data_ptr() for v in self._vals]
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        self._io: dict = {}                              # (first row, rows) -> the batched step's IOBinding

    @contextmanager
    def using(self):
        """Held while a run binds and uses the pool's memory (any thread; several at once): grow waits for them."""
        with self._cv:
            while self._growing:
                self._cv.wait()
            self._users += 1
        try:
            yield
        finally:
            with self._cv:
                self._users -= 1
                self._cv.notify_all()

    def grow(self, capacity: int) -> None:
        """Rows of `capacity` (more than now) for every slot: new buffers with each row's cache copied in, the
        states' capacities and views updated and their bindings dropped (made again at their next run). Waits for
        the runs in flight (using); must not be called while holding using()."""
        with self._cv:
            while self._growing or self._users:
                self._cv.wait()
            if capacity <= self.capacity:
                return
            self._growing = True
        try:
            old = self.arrays if self.arrays is not None else [v.numpy() for v in self._vals]
            old = [a[:, :, : self.capacity] for a in old]          # (not the spare row)
            self._alloc(self.shape[0], self.shape[1], int(capacity), self.shape[3], old)
            for r in range(self.shape[0]):
                st = self._owner(r)
                if st is not None:
                    st.cache["capacity"] = self.capacity
                    if self.arrays is not None:
                        st.cache["arrays"] = [a[r:r + 1] for a in self.arrays]
                    st.extra.pop("io", None)
        finally:
            with self._cv:
                self._growing = False
                self._cv.notify_all()

    def has_free(self) -> bool:
        return any(self._owner(r) is None for r in range(self.shape[0]))

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
        with self.using():
            return self._spans(sess, states, tokens, row_feeds)

    def _spans(self, sess, states: list, tokens: list[int], row_feeds: dict) -> list[np.ndarray]:
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
