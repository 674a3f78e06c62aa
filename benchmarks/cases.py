"""Benchmark cases: a Pallas TPU kernel call and a jnp reference of its math.

Every ``Case`` has

* ``make_args(rng)``: deterministic inputs (NumPy generator -> jax arrays),
* ``reference(*args)``: the same math in plain jnp (the "xla" mode),
* ``kernel(*args, interpret=...)``: the Pallas call. Our own kernels pass
  ``interpret`` to ``pl.pallas_call``; kernels from
  ``jax.experimental.pallas.ops.tpu`` take no such argument, so the case sets
  ``force_mode`` and the runner traces them under
  ``pltpu.force_tpu_interpret_mode(interpret)``.

Outputs of both functions must have matching pytree structure; the runner
reports the max abs difference between them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import flash_attention as flash
from jax.experimental.pallas.ops.tpu import matmul as pallas_matmul
from jax.experimental.pallas.ops.tpu import megablox
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention_kernel
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from benchmarks import collective_kernels
from benchmarks import kernels
from benchmarks import sort_kernel

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
ALL_MODES = ("xla", "interpret", "tpu_interpret", "fast")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark: a kernel call and its jnp reference."""

    name: str
    family: str
    description: str
    make_args: Callable[[np.random.Generator], tuple[Any, ...]]
    reference: Callable[..., Any]
    kernel: Callable[..., Any]
    force_mode: bool = False
    slow_modes: frozenset[str] = frozenset()
    # Simulated CPU devices the case needs (the worker sets the count
    # before JAX starts its backend). The kernel and reference run inside
    # shard_map over a 1-D mesh of that many devices.
    num_devices: int = 1


def _normal(rng: np.random.Generator, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape, np.float32) * scale).astype(dtype)


def _ops_kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adapts an ops kernel (no ``interpret`` argument) to the case API."""

    def kernel(*args, interpret=None):
        del interpret  # Set by the runner through force_tpu_interpret_mode.
        return fn(*args)

    return kernel


# ---------------------------------------------------------------- matmul ---

def _matmul_case(size: int, dtype, block: int, slow=()) -> Case:
    steps = (size // block) ** 3
    dname = jnp.dtype(dtype).name
    return Case(
        name=f"matmul_{size}_{dname}",
        family="matmul",
        description=f"ops matmul {size}^3 {dname}, {block}-blocks ({steps} steps)",
        make_args=lambda rng: (_normal(rng, (size, size), dtype),
                               _normal(rng, (size, size), dtype)),
        reference=lambda x, y: jnp.dot(
            x, y, preferred_element_type=jnp.float32).astype(x.dtype),
        kernel=_ops_kernel(lambda x, y: pallas_matmul.matmul(
            x, y, block_shape=(block, block), block_k=block)),
        force_mode=True,
        slow_modes=frozenset(slow),
    )


# ------------------------------------------------------------- attention ---

def _attention(q, k, v, *, causal: bool, sm_scale: float):
    """Softmax attention over the last two axes ``(..., seq, head_dim)``."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k,
                        preferred_element_type=jnp.float32) * sm_scale
    if causal:
        q_len, k_len = logits.shape[-2:]
        mask = jnp.arange(q_len)[:, None] >= jnp.arange(k_len)[None, :]
        logits = jnp.where(mask, logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("...qk,...kd->...qd", weights, v.astype(jnp.float32)
                      ).astype(q.dtype)


def _qkv(rng, shape, n=3):
    return tuple(_normal(rng, shape) for _ in range(n))


def _flash_fwd_case(shape=(1, 2, 512, 128)) -> Case:
    sm_scale = 1.0 / math.sqrt(shape[-1])
    return Case(
        name="flash_fwd_causal",
        family="attention",
        description=f"ops flash_attention forward {shape} causal",
        make_args=lambda rng: _qkv(rng, shape),
        reference=functools.partial(_attention, causal=True, sm_scale=sm_scale),
        kernel=_ops_kernel(lambda q, k, v: flash.flash_attention(
            q, k, v, causal=True, sm_scale=sm_scale)),
        force_mode=True,
    )


def _attention_grads(attention: Callable[..., Any]) -> Callable[..., Any]:
    """(q, k, v, dout) -> grads of sum(attention(q, k, v) * dout)."""

    def grads(q, k, v, dout):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v) * dout)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return grads


def _flash_bwd_case(shape=(1, 2, 256, 128)) -> Case:
    sm_scale = 1.0 / math.sqrt(shape[-1])
    return Case(
        name="flash_bwd_causal",
        family="attention",
        description=f"ops flash_attention grad wrt q,k,v {shape} causal",
        make_args=lambda rng: _qkv(rng, shape, 4),
        reference=_attention_grads(functools.partial(
            _attention, causal=True, sm_scale=sm_scale)),
        kernel=_ops_kernel(_attention_grads(functools.partial(
            flash.flash_attention, causal=True, sm_scale=sm_scale))),
        force_mode=True,
    )


@functools.cache
def _splash_kernel(heads: int, seq: int) -> splash.SplashAttentionKernel:
    mask = splash_mask.MultiHeadMask(
        [splash_mask.CausalMask((seq, seq)) for _ in range(heads)])
    return splash.make_splash_mha(mask=mask, head_shards=1, q_seq_shards=1)


def _splash_case(shape=(2, 512, 128)) -> Case:
    heads, seq, head_dim = shape
    scale = 1.0 / math.sqrt(head_dim)  # Splash does not scale: pre-scale q.
    return Case(
        name="splash_causal",
        family="attention",
        description=f"ops splash attention (heads, seq, head_dim)={shape} causal",
        make_args=lambda rng: (_normal(rng, shape, scale=scale),
                               *_qkv(rng, shape, 2)),
        reference=functools.partial(_attention, causal=True, sm_scale=1.0),
        kernel=_ops_kernel(lambda q, k, v: _splash_kernel(heads, seq)(q, k, v)),
        force_mode=True,
    )


# ------------------------------------------------------- paged attention ---

@dataclasses.dataclass(frozen=True)
class PagedConfig:
    """Shapes of the paged-attention case."""

    lengths: tuple[int, ...] = (128, 77, 33, 100)
    q_heads: int = 8
    kv_heads: int = 2
    head_dim: int = 128
    page_size: int = 16
    pages_per_seq: int = 8
    total_pages: int = 40
    pages_per_compute_block: int = 4


def _paged_args(cfg: PagedConfig, rng: np.random.Generator):
    batch = len(cfg.lengths)
    q = _normal(rng, (batch, cfg.q_heads, cfg.head_dim), scale=0.3)
    pages = (cfg.kv_heads, cfg.total_pages, cfg.page_size, cfg.head_dim)
    # The kernel computes with K and V cast to bf16: keep them bf16-exact.
    k_pages, v_pages = (_normal(rng, pages, jnp.bfloat16).astype(jnp.float32)
                        for _ in range(2))
    lengths = jnp.asarray(cfg.lengths, jnp.int32)
    page_indices = jnp.asarray(rng.permutation(cfg.total_pages)[
        :batch * cfg.pages_per_seq].reshape(batch, cfg.pages_per_seq), jnp.int32)
    return q, k_pages, v_pages, lengths, page_indices


def _paged_reference(q, k_pages, v_pages, lengths, page_indices):
    kv_heads, _, page_size, head_dim = k_pages.shape
    batch, q_heads, _ = q.shape
    group = q_heads // kv_heads

    def one(q_b, length, pages):
        k = k_pages[:, pages].reshape(kv_heads, -1, head_dim)
        v = v_pages[:, pages].reshape(kv_heads, -1, head_dim)
        logits = jnp.einsum("hgd,htd->hgt", q_b.reshape(kv_heads, group, head_dim), k)
        logits = jnp.where(jnp.arange(k.shape[1]) < length, logits, MASK_VALUE)
        out = jnp.einsum("hgt,htd->hgd", jax.nn.softmax(logits, axis=-1), v)
        return out.reshape(q_heads, head_dim)

    return jax.vmap(one)(q, lengths, page_indices)


def _paged_case(cfg: PagedConfig = PagedConfig()) -> Case:
    return Case(
        name="paged_attention",
        family="attention",
        description=(f"ops paged_attention {len(cfg.lengths)} seqs, "
                     f"{cfg.q_heads} q heads / {cfg.kv_heads} kv heads"),
        make_args=functools.partial(_paged_args, cfg),
        reference=_paged_reference,
        kernel=_ops_kernel(functools.partial(
            paged_attention_kernel.paged_attention,
            pages_per_compute_block=cfg.pages_per_compute_block)),
        force_mode=True,
    )


# ------------------------------------------------ ragged paged attention ---

@dataclasses.dataclass(frozen=True)
class RaggedConfig:
    """Sequences as (query length, kv length): decodes and prefills."""

    seqs: tuple[tuple[int, int], ...] = ((1, 40), (1, 57), (24, 24), (6, 50))
    padded_tokens: int = 40
    q_heads: int = 8
    kv_heads: int = 2
    head_dim: int = 128
    page_size: int = 16
    pages_per_seq: int = 4
    total_pages: int = 16
    kv_pages_per_block: int = 2
    queries_per_block: int = 8

    @property
    def cu_q_lens(self) -> tuple[int, ...]:
        return tuple(int(c) for c in np.cumsum([0] + [q for q, _ in self.seqs]))

    @property
    def sm_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


def _ragged_args(cfg: RaggedConfig, rng: np.random.Generator):
    q = _normal(rng, (cfg.padded_tokens, cfg.q_heads, cfg.head_dim))
    kv_pages = _normal(rng, (cfg.total_pages, cfg.page_size,
                             2 * cfg.kv_heads, cfg.head_dim))
    kv_lens = jnp.asarray([kv for _, kv in cfg.seqs], jnp.int32)
    page_indices = jnp.asarray(rng.permutation(cfg.total_pages).reshape(
        len(cfg.seqs), cfg.pages_per_seq), jnp.int32)
    cu_q_lens = jnp.asarray(cfg.cu_q_lens, jnp.int32)
    num_seqs = jnp.asarray([len(cfg.seqs)], jnp.int32)
    return q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs


def _ragged_reference(cfg: RaggedConfig, q, kv_pages, kv_lens, page_indices,
                      cu_q_lens, num_seqs):
    """Causal attention per sequence, from the static lengths in ``cfg``."""
    del kv_lens, cu_q_lens, num_seqs  # Static copies live in cfg.
    group = cfg.q_heads // cfg.kv_heads
    outs = []
    for i, (q_len, kv_len) in enumerate(cfg.seqs):
        start = cfg.cu_q_lens[i]
        pages = kv_pages[page_indices[i]].reshape(-1, 2 * cfg.kv_heads, cfg.head_dim)
        k = jnp.repeat(pages[:kv_len, 0::2], group, axis=1)
        v = jnp.repeat(pages[:kv_len, 1::2], group, axis=1)
        logits = jnp.einsum("qhd,khd->hqk", q[start:start + q_len], k) * cfg.sm_scale
        q_pos = kv_len - q_len + jnp.arange(q_len)[:, None]
        logits = jnp.where(q_pos >= jnp.arange(kv_len)[None, :], logits, MASK_VALUE)
        outs.append(jnp.einsum("hqk,khd->qhd", jax.nn.softmax(logits, axis=-1), v))
    return jnp.concatenate(outs, axis=0)


def _ragged_kernel(cfg: RaggedConfig, *args):
    out = rpa.ragged_paged_attention(
        *args, sm_scale=cfg.sm_scale,
        num_kv_pages_per_block=cfg.kv_pages_per_block,
        num_queries_per_block=cfg.queries_per_block)
    return out[:cfg.cu_q_lens[-1]]


def _ragged_case(cfg: RaggedConfig = RaggedConfig()) -> Case:
    return Case(
        name="ragged_paged_attention",
        family="attention",
        description=(f"ops ragged_paged_attention (q_len, kv_len)={cfg.seqs}, "
                     f"{cfg.q_heads} q heads / {cfg.kv_heads} kv heads"),
        make_args=functools.partial(_ragged_args, cfg),
        reference=functools.partial(_ragged_reference, cfg),
        kernel=_ops_kernel(functools.partial(_ragged_kernel, cfg)),
        force_mode=True,
    )


# ------------------------------------------------------------------- gmm ---

def _gmm_reference(lhs, rhs, group_sizes):
    ends = jnp.cumsum(group_sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
    out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
    for g in range(rhs.shape[0]):
        out = jnp.where((row_group == g)[:, None], lhs @ rhs[g], out)
    return out


def _gmm_case(m=512, k=256, n=256, group_sizes=(96, 160, 128, 128)) -> Case:
    return Case(
        name="gmm",
        family="matmul",
        description=f"ops megablox gmm {m}x{k}x{n}, groups {group_sizes}",
        make_args=lambda rng: (_normal(rng, (m, k)),
                               _normal(rng, (len(group_sizes), k, n)),
                               jnp.asarray(group_sizes, jnp.int32)),
        reference=_gmm_reference,
        kernel=_ops_kernel(lambda lhs, rhs, sizes: megablox.gmm(
            lhs, rhs, sizes, jnp.float32)),
        force_mode=True,
    )


# ------------------------------------------------------------------ sort ---

def _sort_case(n: int, *, argsort=False, descending=False, slow=()) -> Case:
    kind = ("argsort" if argsort else "sort") + ("_desc" if descending else "")
    kernel_fn = sort_kernel.bitonic_argsort if argsort else sort_kernel.bitonic_sort
    ref_fn = sort_kernel.reference_argsort if argsort else sort_kernel.reference_sort
    return Case(
        name=f"{kind}_8x{n}",
        family="sort",
        description=f"bitonic {kind} of a flattened (8,{n}) f32 array",
        make_args=lambda rng: (_normal(rng, (sort_kernel.SUBLANES, n)),),
        reference=functools.partial(ref_fn, descending=descending),
        kernel=functools.partial(kernel_fn, descending=descending),
        slow_modes=frozenset(slow),
    )


# ------------------------------------------------------ own small kernels ---

def _dma_case(chunks=64, rows=32) -> Case:
    shape = (chunks * rows, kernels.LANES)
    return Case(
        name=f"dma_double_buffer_{chunks}",
        family="dma",
        description=(f"manual double-buffered DMA, {chunks} chunks of "
                     f"({rows},128) f32, in and out through HBM"),
        make_args=lambda rng: (_normal(rng, shape),),
        reference=kernels.dma_compute,
        kernel=functools.partial(kernels.double_buffered_dma, chunks=chunks),
    )


# ----------------------------------------------------------- collectives ---

def _on_ring(n: int, fn: Callable[..., Any], in_spec, out_spec):
    """``fn`` inside shard_map over a ring of ``n`` devices named "x"."""
    P = jax.sharding.PartitionSpec

    def call(x):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("x",))
        return jax.shard_map(fn, mesh=mesh, in_specs=P(*in_spec),
                             out_specs=P(*out_spec), check_vma=False)(x)

    return call


def _all_gather_case(n: int, rows=64) -> Case:
    shape = (n * rows, kernels.LANES)
    kernel = lambda x, interpret=None: _on_ring(n, functools.partial(
        collective_kernels.ring_all_gather, axis="x", n=n,
        interpret=interpret), ("x",), ("x",))(x)
    return Case(
        name=f"all_gather_ring_{n}dev",
        family="collective",
        description=(f"ring all-gather of ({rows},128) f32 shards over {n} "
                     "devices, remote DMAs (vs lax.all_gather)"),
        make_args=lambda rng: (_normal(rng, shape),),
        reference=_on_ring(n, lambda x: jax.lax.all_gather(x, "x"), ("x",),
                           ("x",)),
        kernel=kernel,
        num_devices=n,
        # pltpu.InterpretParams() hangs on this kernel (no barrier before
        # the first remote copy); --skip-slow-modes leaves it out.
        slow_modes=frozenset({"tpu_interpret"}),
    )


def _reduce_scatter_case(n: int, rows=16) -> Case:
    shape = (n, rows, n * kernels.LANES)
    kernel = lambda x, interpret=None: _on_ring(n, functools.partial(
        collective_kernels.ring_reduce_scatter, axis="x", n=n,
        bidirectional=True, interpret=interpret),
        (None, None, "x"), (None, "x"))(x)
    return Case(
        name=f"reduce_scatter_{n}dev",
        family="collective",
        description=(f"bidirectional reduce-scatter of ({n},{rows},128) f32 "
                     f"over {n} devices, remote DMAs and signals "
                     "(vs lax.psum_scatter)"),
        make_args=lambda rng: (_normal(rng, shape),),
        reference=_on_ring(n, lambda x: jax.lax.psum_scatter(x, "x"),
                           (None, None, "x"), (None, "x")),
        kernel=kernel,
        num_devices=n,
    )


def _size_label(nbytes: int) -> str:
    for unit, size in (("MB", 2**20), ("KB", 2**10)):
        if nbytes >= size:
            return f"{nbytes // size}{unit}"
    return f"{nbytes}B"


def _add_one_case(nblocks: int, steps=4096, slow=()) -> Case:
    shape = (nblocks * kernels.SUBLANES, kernels.LANES)
    nbytes = 4 * shape[0] * shape[1]
    return Case(
        name=f"add_one_{_size_label(nbytes)}",
        family="scaling",
        description=(f"x + 1, {steps} grid steps of (8,128) blocks over "
                     f"{nblocks} blocks ({nbytes / 1e6:.3g} MB)"),
        make_args=lambda rng: (_normal(rng, shape),),
        reference=lambda x: x + 1.0,
        kernel=functools.partial(kernels.add_one, steps=steps),
        slow_modes=frozenset(slow),
    )


# Pairs marked slow take over 30 s on the first call or over 2 s per call on
# a 2-core CPU; --skip-slow-modes (and --quick) skip them.
_SLOW_SORT = ("interpret", "tpu_interpret")


def all_cases() -> tuple[Case, ...]:
    """Every benchmark case, in report order."""
    return (
        _matmul_case(512, jnp.float32, 128),
        _matmul_case(1024, jnp.bfloat16, 128, slow=("tpu_interpret",)),
        _gmm_case(),
        _flash_fwd_case(),
        _flash_bwd_case(),
        _splash_case(),
        _paged_case(),
        _ragged_case(),
        _sort_case(128, slow=_SLOW_SORT),
        _sort_case(128, descending=True, slow=_SLOW_SORT),
        _sort_case(128, argsort=True, slow=_SLOW_SORT),
        _sort_case(2048, slow=_SLOW_SORT),
        _dma_case(),
        _add_one_case(8, slow=("tpu_interpret",)),
        _add_one_case(64, slow=("tpu_interpret",)),
        _add_one_case(512, slow=("tpu_interpret",)),
        _add_one_case(4096, slow=("interpret", "tpu_interpret")),
        _all_gather_case(4),
        _all_gather_case(8),
        _reduce_scatter_case(4),
        _reduce_scatter_case(8),
    )


def select_cases(patterns: Sequence[str] | None) -> tuple[Case, ...]:
    """Cases whose name or family matches any glob in ``patterns``."""
    cases = all_cases()
    if not patterns:
        return cases
    chosen = tuple(c for c in cases if any(
        fnmatch.fnmatch(c.name, p) or c.family == p for p in patterns))
    if not chosen:
        raise ValueError(f"no case matches {list(patterns)}; "
                         f"known: {[c.name for c in cases]}")
    return chosen


def get_case(name: str) -> Case:
    """The case called ``name``."""
    for case in all_cases():
        if case.name == name:
            return case
    raise KeyError(f"unknown case {name!r}")


def case_seed(name: str) -> int:
    """A stable per-case RNG seed."""
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name))
