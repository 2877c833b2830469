r"""The fast path of :func:`equiv.compare.compare_leaf`: per-chunk maxima, two threads.

A big leaf is cut into chunks of :data:`CHUNK` elements (1 MiB of float32, so a
chunk stays in cache while it is read several times). For each chunk, in the
compute dtype, with NumPy ufuncs writing into per-thread buffers (no fresh
allocations) and the chunks shared among :data:`THREADS` threads (NumPy releases
the GIL inside ufunc loops):

* ``max |a - b|`` (NaN if any entry is NaN, Inf if any is Inf: then the caller
  takes the full NumPy path, which places every non-finite entry),
* ``max(max a, -min a, max b, -min b)``, the scale ``S`` of the derived bound,
* ``max |a - b| / |b|``, ``b`` the expected side as in ``torch.testing.assert_close``
  (``0/0`` skipped: equal zeros differ by nothing),
* with ``rtol > 0``: ``max |a - b| / (atol + rtol·|b|)``.

The chunk maxima locate the greatest differences; the caller recomputes only
those chunks to get the first index, exactly as ``np.argmax`` would, so both
paths give identical statistics.

Why not a jitted XLA kernel (measured with jax 0.10 on this 2-core CPU): one
fused ``max |a - b|`` streams at about 16 GB/s on one core, but every further
scalar reduction reads the inputs again at a similar cost, the division of the
relative difference costs 2.5 times that, multi-output fusions and ``lax.map``
over cached segments ran at 0.4 Gelem/s per core against NumPy's 0.8, and two
traps made exactness costly: a NaN reaching ``jnp.max`` can silently lower the
result (the NaN resets the running maximum) and XLA on CPU treats subnormal
inputs as zero (DAZ/FTZ) where NumPy does not.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np

#: Leaves with at least this many elements take the fast path.
FAST_THRESHOLD = 1 << 20
#: Elements per chunk.
CHUNK = 1 << 18
#: Worker threads (NumPy releases the GIL inside ufunc loops).
THREADS = max(1, min(4, os.cpu_count() or 1))

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_local = threading.local()


def scratch(count: int, n: int, dtype: np.dtype) -> list[np.ndarray]:
    """``count`` reusable buffers of ``n`` elements for the calling thread.

    Fresh allocations of a megabyte cost more here than the arithmetic on them (the
    kernel faults in every page), so each thread keeps its buffers between calls.
    """
    key = (np.dtype(dtype).str, n)
    cache = getattr(_local, "buffers", None)
    if cache is None:
        cache = _local.buffers = {}
    buffers = cache.setdefault(key, [])
    while len(buffers) < count:
        buffers.append(np.empty(n, dtype))
    return buffers[:count]


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(THREADS, "equiv-compare")
        return _pool


def _work(a, b, ct, c, rtol, chunk, starts, out) -> None:
    d, q, x, y = scratch(4, chunk, ct)
    x = x if a.dtype != ct else None
    y = y if b.dtype != ct else None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for k, lo in starts:
            xa, yb = a[lo : lo + chunk], b[lo : lo + chunk]
            n = xa.size
            if x is not None:
                np.copyto(x[:n], xa, casting="unsafe")
                xa = x[:n]
            if y is not None:
                np.copyto(y[:n], yb, casting="unsafe")
                yb = y[:n]
            dd, qq = d[:n], q[:n]
            np.subtract(xa, yb, out=dd)
            np.abs(dd, out=dd)
            out["max_abs"][k] = dd.max()
            out["scale"][k] = max(xa.max(), -xa.min(), yb.max(), -yb.min())
            np.abs(yb, out=qq)
            if rtol:
                # The ratio first (it needs |b|), then the relative difference.
                np.multiply(qq, rtol, out=qq)
                np.add(qq, c, out=qq)
                np.divide(dd, qq, out=qq)
                out["ratio"][k] = np.fmax.reduce(qq)
                np.abs(yb, out=qq)
            np.divide(dd, qq, out=qq)
            out["max_rel"][k] = np.fmax.reduce(qq)


def chunk_maxima(
    a: np.ndarray,
    b: np.ndarray,
    dtype: np.dtype,
    *,
    c: float = 0.0,
    rtol: float = 0.0,
    chunk: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-chunk maxima of two flat arrays compared in ``dtype`` (see the module
    docstring); ``c`` and ``rtol`` give the ratio ``|a - b| / (c + rtol·|b|)``
    when ``rtol > 0`` (``c`` or ``rtol`` past the dtype's range is inf there: the
    caller then takes the NumPy path). ``b`` is the expected side: the relative
    difference is ``|a - b| / |b|``. A chunk whose relative differences are all
    ``0/0`` has ``max_rel`` NaN (read it as 0).

    >>> a = np.arange(8, dtype=np.float32); b = a.copy(); b[6] += 2
    >>> out = chunk_maxima(a, b, np.dtype(np.float32), chunk=4)
    >>> out["max_abs"].tolist(), out["scale"].tolist(), out["max_rel"].tolist()
    ([0.0, 2.0], [3.0, 8.0], [0.0, 0.25])
    """
    ct = np.dtype(dtype)
    chunk = chunk or CHUNK
    starts = list(enumerate(range(0, a.size, chunk)))
    names = ["max_abs", "scale", "max_rel"] + (["ratio"] if rtol else [])
    out = {name: np.zeros(len(starts), ct) for name in names}
    with np.errstate(over="ignore"):  # past the dtype's range: inf (the caller defers)
        c, rtol = ct.type(c), ct.type(rtol)
    workers = min(THREADS, len(starts))
    if workers <= 1:
        _work(a, b, ct, c, rtol, chunk, starts, out)
        return out
    # Contiguous runs per thread: each streams its own part of memory.
    per = -(-len(starts) // workers)
    futures = [
        _executor().submit(_work, a, b, ct, c, rtol, chunk, starts[i : i + per], out)
        for i in range(0, len(starts), per)
    ]
    for future in futures:
        future.result()
    return out
