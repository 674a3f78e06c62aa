"""Acceptance tests: paged attention and ragged paged attention TPU kernels.

Each test runs a kernel from `jax.experimental.pallas.ops.tpu` under the mode
chosen by $FAST_INTERPRET_TEST_MODE (default "fast" = fast_interpret; "hlo" =
JAX's interpret=True; "tpu" = JAX's TPU interpret mode) and compares it with an
independent NumPy / plain-jnp reference written here.

Known JAX failures (jax 0.10.2), skipped in those modes only; the fast mode
must pass every test:
* both JAX interpret modes fail on `ragged_paged_attention` (the exact errors
  are in RAGGED_KNOWN_FAILURES below). The ragged reference is therefore
  validated without the kernel (test_reference_matches_loop): against a plain
  per-token attention loop and against the module's own reference.
* JAX's TPU interpret mode hangs on paged_attention with a megacore_mode
  (PAGED_MEGACORE_HANGS_IN below).

Larger shapes are decorated with @slow and only run when
FAST_INTERPRET_SLOW_TESTS=1.

Run:  python -m pytest tests/paged_attention_test.py -q
      FAST_INTERPRET_TEST_MODE=hlo \
          python -m pytest tests/paged_attention_test.py -q
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.experimental.pallas.ops.tpu import paged_attention as paged_lib
from jax.experimental.pallas.ops.tpu import ragged_paged_attention as ragged_lib
from jax.experimental.pallas.ops.tpu.paged_attention import quantization_utils
import jax.numpy as jnp
import numpy as np

try:
  from tests import test_util  # pylint: disable=g-import-not-at-top
except ImportError:
  import test_util  # pylint: disable=g-import-not-at-top

slow = test_util.slow


def _softmax_attention(q, k, v, mask=None):
  """softmax(q @ k^T, masked) @ v in float64 NumPy. q [G, D]; k, v [L, D]."""
  s = q @ k.T
  if mask is not None:
    s = np.where(mask, s, -np.inf)
  s = s - s.max(axis=-1, keepdims=True)
  p = np.exp(s)
  p = p / p.sum(axis=-1, keepdims=True)
  return p @ v


# ---------------------------------------------------------------------------
# paged_attention (ops/tpu/paged_attention)


def paged_attention_reference(q, k_pages, v_pages, lengths, page_indices, *,
                              soft_cap=None):
  """Per (sequence, kv head) attention over the sequence's first `length`
  cached tokens, gathered page by page (float64 NumPy).

  q: [B, Hq, D]; k_pages, v_pages: [Hkv, P, page_size, D] float64 (already
  dequantized / rounded by the caller); q head h uses kv head h // (Hq / Hkv).
  No softmax scale (the kernel applies none). Empty sequences give zeros.
  """
  q = test_util.to_f64(q)
  batch, num_q_heads, head_dim = q.shape
  num_kv_heads = k_pages.shape[0]
  group = num_q_heads // num_kv_heads
  out = np.zeros_like(q)
  for b in range(batch):
    length = int(lengths[b])
    if length == 0:
      continue
    for h in range(num_kv_heads):
      k = k_pages[h, page_indices[b]].reshape(-1, head_dim)[:length]
      v = v_pages[h, page_indices[b]].reshape(-1, head_dim)[:length]
      qg = q[b, h * group:(h + 1) * group]
      if soft_cap is None:
        out[b, h * group:(h + 1) * group] = _softmax_attention(qg, k, v)
      else:
        s = np.tanh((qg @ k.T) / soft_cap) * soft_cap
        p = np.exp(s - s.max(-1, keepdims=True))
        out[b, h * group:(h + 1) * group] = (p / p.sum(-1, keepdims=True)) @ v
  return out


def _paged_case(name, *, batch=2, q_heads=4, kv_heads=2, head_dim=128,
                page_size=16, pages_per_seq=8, pages_per_block=2,
                lengths=None, megacore=None, inline=True, int8=False,
                dtype=jnp.float32, soft_cap=None):
  return dict(testcase_name=name, batch=batch, q_heads=q_heads,
              kv_heads=kv_heads, head_dim=head_dim, page_size=page_size,
              pages_per_seq=pages_per_seq, pages_per_block=pages_per_block,
              lengths=lengths, megacore=megacore, inline=inline, int8=int8,
              dtype=dtype, soft_cap=soft_cap)

# Grid: (cores, batch [/2 for "batch"], kv_heads [/2 for "kv_head"]) and, when
# inline=False, a 4th axis of pages_per_seq / pages_per_block.
_PAGED_CASES = [
    _paged_case("f32_megacore_none", lengths=(37, 128)),
    _paged_case("f32_megacore_kv_head", lengths=(50, 97), megacore="kv_head"),
    _paged_case("f32_megacore_batch", batch=4, lengths=(128, 1, 77, 32),
                megacore="batch"),
    _paged_case("f32_not_inline_grid16", lengths=(128, 45), inline=False),
    _paged_case("f32_b4_kv4_inline_grid16", batch=4, q_heads=8, kv_heads=4,
                lengths=(100, 16, 128, 3)),
    _paged_case("f32_empty_and_length1_sequences", batch=4,
                lengths=(0, 1, 60, 0)),
    _paged_case("f32_group8_mqa", q_heads=8, kv_heads=1, lengths=(90, 33)),
    _paged_case("f32_soft_cap", lengths=(70, 128), soft_cap=3.0),
    _paged_case("bf16", lengths=(37, 100), dtype=jnp.bfloat16),
    _paged_case("int8_megacore_none", lengths=(37, 128), int8=True),
    _paged_case("int8_megacore_kv_head", lengths=(64, 81), int8=True,
                megacore="kv_head"),
    _paged_case("int8_megacore_batch", batch=4, lengths=(5, 128, 66, 17),
                int8=True, megacore="batch"),
    _paged_case("int8_not_inline_megacore_batch_grid32", batch=4,
                lengths=(128, 20, 100, 128), int8=True, megacore="batch",
                inline=False),
]

_PAGED_SLOW_CASES = [
    _paged_case("f32_b8_h32_kv8_not_inline_grid1024", batch=8, q_heads=32,
                kv_heads=8, pages_per_seq=64, pages_per_block=4,
                lengths=(1024, 1, 517, 800, 64, 999, 300, 1000),
                inline=False),
    _paged_case("int8_b8_h32_kv8_kv_head", batch=8, q_heads=32, kv_heads=8,
                pages_per_seq=64, pages_per_block=8,
                lengths=(1024, 1, 517, 800, 64, 999, 300, 1000), int8=True,
                megacore="kv_head"),
]


# JAX's TPU interpret mode (with its default num_cores_or_threads=1) runs a
# pallas_call's grid on one simulated core,
# sharing SMEM across the "cores" of the leading megacore axis. The kernel
# keeps `init_flag` in SMEM and prefetches a core's first block only while it
# is set, so the second core's first DMA wait is never satisfied: the call
# hangs (observed: no progress within 240 s on the smallest case). The kernel's
# docstring warns about this on chips without megacore.
PAGED_MEGACORE_HANGS_IN = {"tpu"}


class PagedAttentionTest(test_util.KernelTestCase):

  def _check(self, batch, q_heads, kv_heads, head_dim, page_size,
             pages_per_seq, pages_per_block, lengths, megacore, inline, int8,
             dtype, soft_cap):
    if megacore is not None and self.mode in PAGED_MEGACORE_HANGS_IN:
      self.skipTest(f"megacore_mode={megacore!r} hangs in JAX's {self.mode} "
                    "interpret mode (one simulated core, shared SMEM)")
    r = test_util.rng(7)
    total_pages = batch * pages_per_seq + 5  # A few pages nobody uses.
    q = test_util.normal(r, (batch, q_heads, head_dim), dtype)
    pages_shape = (kv_heads, total_pages, page_size, head_dim)
    k_pages = test_util.normal(r, pages_shape, dtype)
    v_pages = test_util.normal(r, pages_shape, dtype)
    # Scatter each sequence's pages randomly over the cache.
    page_indices = jnp.asarray(
        r.permutation(total_pages)[:batch * pages_per_seq].reshape(
            batch, pages_per_seq), jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    assert int(lengths.max()) <= pages_per_seq * page_size

    if int8:
      k_arg = quantization_utils.quantize_to_int8(k_pages)
      v_arg = quantization_utils.quantize_to_int8(v_pages)
      # Dequantized value: w * scale / 127.5 (scale = max |row|), computed
      # here from the int8 weights and scales.
      k_ref, v_ref = (test_util.to_f64(t.weight) * test_util.to_f64(t.scales)
                      / 127.5 for t in (k_arg, v_arg))
    else:
      k_arg, v_arg = k_pages, v_pages
      # The kernel casts unquantized K/V pages to bf16 after loading them
      # (MultiPageAsyncCopyDescriptor._maybe_dequantize), then computes in f32.
      k_ref, v_ref = (test_util.round_to(test_util.to_f64(t), jnp.bfloat16)
                      for t in (k_pages, v_pages))

    # A megacore kernel runs on two TensorCores with their own SMEM; on one
    # core it would hang (fast interpret reports the DMA wait that never
    # returns), so simulate the chip it is written for.
    out = self.run_kernel(lambda: paged_lib.paged_attention(
        q, k_arg, v_arg, lengths, page_indices,
        pages_per_compute_block=pages_per_block, megacore_mode=megacore,
        inline_seq_dim=inline, attn_logits_soft_cap=soft_cap),
        num_cores=1 if megacore is None else 2)
    self.assertEqual(out.shape, q.shape)
    self.assertEqual(out.dtype, q.dtype)
    expected = paged_attention_reference(
        q, k_ref, v_ref, np.asarray(lengths), np.asarray(page_indices),
        soft_cap=soft_cap)
    self.assert_close(out, expected)

  @parameterized.named_parameters(*_PAGED_CASES)
  def test_paged_attention(self, **kw):
    self._check(**kw)

  @parameterized.named_parameters(*_PAGED_SLOW_CASES)
  @slow
  def test_paged_attention_large(self, **kw):
    self._check(**kw)


# ---------------------------------------------------------------------------
# ragged_paged_attention (ops/tpu/ragged_paged_attention)

# What JAX's own interpret modes raise on this kernel in jax 0.10.2 (matched
# as a substring of "ExceptionType: message" by test_ragged_paged_attention,
# which then skips in that mode; any other error still fails the test):
# * hlo (interpret=True), at trace time, while discharging the masked
#   `pltpu.store` of masked_store (kernel.py:494, first reached for
#   `m_ref.at[kv_head_idx]`) in jax/_src/pallas/primitives.py
#   _swap_discharge_rule:
#     AttributeError: 'TypedInt' object has no attribute 'shape'
# * tpu (InterpretParams()), at run time, loading through the
#   `kv_bufs.at[buf_idx].reshape(...)` ref (mosaic/interpret/utils.py to_range):
#     JaxRuntimeError: INTERNAL: CpuCallback error calling callback: ...
#     AttributeError: 'ReshapeTransform' object has no attribute 'indices'
RAGGED_KNOWN_FAILURES = {
    "hlo": "AttributeError: 'TypedInt' object has no attribute 'shape'",
    "tpu": "AttributeError: 'ReshapeTransform' object has no attribute "
           "'indices'",
}


def ragged_reference(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                     *, sm_scale=1.0, sliding_window=None, soft_cap=None):
  """Per-sequence attention over the gathered paged cache (float64 NumPy).

  Query i of sequence s (tokens cu_q_lens[s]:cu_q_lens[s+1]) sits at absolute
  position kv_lens[s] - q_len + i and attends to cached positions j <= that
  position (and j > position - sliding_window). Logits are
  sm_scale * q.k, then soft_cap * tanh(logits / soft_cap). The cache
  interleaves heads: combined head 2h is K of kv head h, 2h+1 is V; q head i
  uses kv head i // (Hq / Hkv). Rows past cu_q_lens[num_seqs] are not defined
  by the kernel and are returned as NaN.
  """
  q = test_util.to_f64(q)
  pages = test_util.to_f64(kv_pages)
  num_tokens, num_q_heads, head_dim = q.shape
  num_kv_heads = pages.shape[2] // 2
  group = num_q_heads // num_kv_heads
  cu = np.asarray(cu_q_lens)
  out = np.full(q.shape, np.nan)
  for s in range(int(num_seqs[0])):
    q0, q1, kv_len = int(cu[s]), int(cu[s + 1]), int(kv_lens[s])
    cache = pages[np.asarray(page_indices[s])].reshape(
        -1, 2 * num_kv_heads, head_dim)[:kv_len]
    k = np.repeat(cache[:, 0::2], group, axis=1)  # [kv_len, Hq, D]
    v = np.repeat(cache[:, 1::2], group, axis=1)
    logits = np.einsum("qhd,khd->hqk", q[q0:q1], k) * sm_scale
    if soft_cap is not None:
      logits = soft_cap * np.tanh(logits / soft_cap)
    row = kv_len - (q1 - q0) + np.arange(q1 - q0)[:, None]  # query position
    col = np.arange(kv_len)[None, :]
    mask = col <= row
    if sliding_window is not None:
      mask &= col > row - sliding_window
    logits = np.where(mask, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[q0:q1] = np.einsum("hqk,khd->qhd", p, v)
  return out


def ragged_loop_reference(q, kv_pages, kv_lens, page_indices, cu_q_lens,
                          num_seqs, *, sm_scale=1.0, sliding_window=None,
                          soft_cap=None):
  """The same attention, written independently as a per-token, per-head loop
  over explicitly windowed key ranges (float64); used to validate
  ragged_reference."""
  q = test_util.to_f64(q)
  pages = test_util.to_f64(kv_pages)
  _, page_size, num_combined, head_dim = pages.shape
  num_q_heads = q.shape[1]
  group = num_q_heads // (num_combined // 2)
  out = np.full(q.shape, np.nan)
  for s in range(int(num_seqs[0])):
    q0, q1 = int(cu_q_lens[s]), int(cu_q_lens[s + 1])
    kv_len = int(kv_lens[s])
    cache = pages[np.asarray(page_indices[s])].reshape(-1, num_combined,
                                                       head_dim)[:kv_len]
    first = kv_len - (q1 - q0)  # position of the sequence's first query
    for h in range(num_q_heads):
      k = cache[:, 2 * (h // group)]
      v = cache[:, 2 * (h // group) + 1]
      for i in range(q1 - q0):
        p = first + i
        lo = 0 if sliding_window is None else max(0, p - sliding_window + 1)
        logits = (k[lo:p + 1] @ q[q0 + i, h]) * sm_scale
        if soft_cap is not None:
          logits = soft_cap * np.tanh(logits / soft_cap)
        w = np.exp(logits - logits.max())
        out[q0 + i, h] = (w / w.sum()) @ v[lo:p + 1]
  return out


def make_ragged_inputs(seqs, *, num_tokens, max_num_seqs, num_q_heads,
                       num_kv_heads, head_dim, page_size, pages_per_seq,
                       dtype, seed):
  """seqs: list of (q_len, kv_len). Returns the kernel's positional inputs."""
  r = test_util.rng(seed)
  n = len(seqs)
  total_pages = max_num_seqs * pages_per_seq + 3
  q = test_util.normal(r, (num_tokens, num_q_heads, head_dim), dtype)
  kv_pages = test_util.normal(
      r, (total_pages, page_size, 2 * num_kv_heads, head_dim), dtype)
  page_indices = r.permutation(total_pages)[:max_num_seqs * pages_per_seq]
  page_indices = page_indices.reshape(max_num_seqs, pages_per_seq)
  q_lens = np.array([s[0] for s in seqs])
  kv_lens = np.zeros(max_num_seqs, np.int32)
  kv_lens[:n] = [s[1] for s in seqs]
  assert np.all(q_lens <= kv_lens[:n])
  assert kv_lens.max() <= pages_per_seq * page_size
  cu_q_lens = np.zeros(max_num_seqs + 1, np.int32)
  cu_q_lens[1:n + 1] = np.cumsum(q_lens)
  cu_q_lens[n + 1:] = cu_q_lens[n]
  assert cu_q_lens[n] <= num_tokens
  return (q, kv_pages, jnp.asarray(kv_lens), jnp.asarray(page_indices,
                                                         jnp.int32),
          jnp.asarray(cu_q_lens), jnp.asarray([n], jnp.int32))


# (q_len, kv_len) per sequence: decodes (q_len 1), a prefill (q_len == kv_len)
# and chunked prefills (1 < q_len < kv_len).
_MIXED = [(1, 37), (24, 24), (13, 70), (1, 128), (1, 1)]
_MIXED_LONG = [(1, 200), (40, 40), (1, 17), (33, 100), (1, 256), (20, 61),
               (1, 5), (27, 27)]


def _ragged_case(name, seqs, *, num_tokens, max_num_seqs=None, q_heads=4,
                 kv_heads=2, head_dim=128, page_size=16, pages_per_seq=8,
                 kv_pages_per_block=2, queries_per_block=16,
                 dtype=jnp.float32, sm_scale=None, sliding_window=None,
                 soft_cap=None):
  return dict(testcase_name=name, seqs=seqs, num_tokens=num_tokens,
              max_num_seqs=max_num_seqs or len(seqs) + 2, q_heads=q_heads,
              kv_heads=kv_heads, head_dim=head_dim, page_size=page_size,
              pages_per_seq=pages_per_seq,
              kv_pages_per_block=kv_pages_per_block,
              queries_per_block=queries_per_block, dtype=dtype,
              sm_scale=head_dim ** -0.5 if sm_scale is None else sm_scale,
              sliding_window=sliding_window, soft_cap=soft_cap)

# Grid: (q_heads / heads_per_block, ceil(num_tokens / queries_per_block)).
_RAGGED_CASES = [
    _ragged_case("f32_mixed_grid4", _MIXED, num_tokens=64),
    _ragged_case("f32_mixed_q8_grid16", _MIXED_LONG, num_tokens=128,
                 pages_per_seq=16, queries_per_block=8, kv_pages_per_block=4),
    _ragged_case("f32_sliding_window_soft_cap", _MIXED, num_tokens=48,
                 sliding_window=20, soft_cap=5.0),
    # (head_dim must be a multiple of 128: the kernel asserts it at trace time.)
    _ragged_case("f32_gqa_h8_kv2", _MIXED, num_tokens=48, q_heads=8),
    _ragged_case("bf16_mixed", _MIXED, num_tokens=48, dtype=jnp.bfloat16),
]

_RAGGED_SLOW_CASES = [
    _ragged_case("bf16_h16_kv8_long_grid16", _MIXED_LONG * 4, num_tokens=512,
                 q_heads=16, kv_heads=8, pages_per_seq=16,
                 queries_per_block=32, kv_pages_per_block=4,
                 dtype=jnp.bfloat16),
]


class RaggedPagedAttentionTest(test_util.KernelTestCase):

  def _inputs(self, seqs, num_tokens, max_num_seqs, q_heads, kv_heads,
              head_dim, page_size, pages_per_seq, dtype, seed=8):
    return make_ragged_inputs(
        seqs, num_tokens=num_tokens, max_num_seqs=max_num_seqs,
        num_q_heads=q_heads, num_kv_heads=kv_heads, head_dim=head_dim,
        page_size=page_size, pages_per_seq=pages_per_seq, dtype=dtype,
        seed=seed)

  def _check(self, seqs, num_tokens, max_num_seqs, q_heads, kv_heads,
             head_dim, page_size, pages_per_seq, kv_pages_per_block,
             queries_per_block, dtype, sm_scale, sliding_window, soft_cap):
    args = self._inputs(seqs, num_tokens, max_num_seqs, q_heads, kv_heads,
                        head_dim, page_size, pages_per_seq, dtype)
    opts = dict(sm_scale=sm_scale, sliding_window=sliding_window,
                soft_cap=soft_cap)
    out = self.run_kernel(
        lambda: ragged_lib.ragged_paged_attention(
            *args, num_kv_pages_per_block=kv_pages_per_block,
            num_queries_per_block=queries_per_block, **opts),
        known_failures=RAGGED_KNOWN_FAILURES)
    self.assertEqual(out.shape, args[0].shape)
    self.assertEqual(out.dtype, args[0].dtype)
    expected = ragged_reference(*args, **opts)
    valid = int(args[4][int(args[5][0])])  # cu_q_lens[num_seqs]
    self.assert_close(out[:valid], expected[:valid])

  @parameterized.named_parameters(*_RAGGED_CASES)
  def test_ragged_paged_attention(self, **kw):
    self._check(**kw)

  @parameterized.named_parameters(*_RAGGED_SLOW_CASES)
  @slow
  def test_ragged_paged_attention_large(self, **kw):
    self._check(**kw)

  @parameterized.named_parameters(
      dict(testcase_name="f32_mixed", seqs=_MIXED, window=None, cap=None),
      dict(testcase_name="f32_window_cap", seqs=_MIXED, window=20, cap=5.0),
      dict(testcase_name="f32_long", seqs=_MIXED_LONG, window=None, cap=None),
  )
  def test_reference_matches_loop(self, seqs, window, cap):
    """Validates ragged_reference (no kernel) against a per-sequence loop and
    against the module's own ref_ragged_paged_attention."""
    args = self._inputs(seqs, 320, len(seqs) + 1, 4, 2, 32, 16, 16,
                        jnp.float32, seed=9)
    opts = dict(sm_scale=0.3, sliding_window=window, soft_cap=cap)
    ours = ragged_reference(*args, **opts)
    valid = int(args[4][len(seqs)])
    test_util.assert_allclose(
        ours[:valid], ragged_loop_reference(*args, **opts)[:valid],
        **test_util.F32_TOL)
    # The module's reference slices with concrete lengths; jit it with the
    # metadata as host constants so it compiles once instead of op by op.
    q, kv_pages, *meta = args
    meta = [np.asarray(m) for m in meta]
    with jax.default_matmul_precision("highest"):
      theirs = jax.jit(lambda q, kv: ragged_lib.ref_ragged_paged_attention(
          q, kv, *meta, **opts))(q, kv_pages)
    test_util.assert_allclose(ours[:valid], test_util.to_f64(theirs)[:valid],
                              **test_util.F32_TOL)


if __name__ == "__main__":
  absltest.main()
