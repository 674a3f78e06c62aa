"""Acceptance tests: flash attention and splash attention Pallas TPU kernels.

Each test runs a kernel from `jax.experimental.pallas.ops.tpu` under the mode
chosen by $FAST_INTERPRET_TEST_MODE (default "fast" = fast_interpret; "hlo" =
JAX's interpret=True; "tpu" = JAX's TPU interpret mode) and compares it with an
independent plain-jnp reference written here (forward, and jax.grad through
the kernels' custom VJPs against autodiff of the reference).

Larger shapes are decorated with @slow and only run when
FAST_INTERPRET_SLOW_TESTS=1.

Run:  python -m pytest tests/attention_kernels_test.py -q
      FAST_INTERPRET_TEST_MODE=hlo \
          python -m pytest tests/attention_kernels_test.py -q
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax import lax
from jax.experimental.pallas.ops.tpu import flash_attention as flash_lib
from jax.experimental.pallas.ops.tpu import splash_attention as splash_lib
import jax.numpy as jnp
import numpy as np

try:
  from tests import test_util  # pylint: disable=g-import-not-at-top
except ImportError:
  import test_util  # pylint: disable=g-import-not-at-top

slow = test_util.slow
HIGHEST = lax.Precision.HIGHEST
# Finite "minus infinity" for masked logits; no test row is fully masked, so
# exp(masked - max) underflows to exactly 0 as in the kernels.
NEG_INF = -1e30


def attention_reference(q, k, v, mask=None, *, bias=None, sm_scale=1.0):
  """softmax((q @ k^T + bias) * sm_scale, masked) @ v in f32, plain jnp.

  q: [..., Sq, D]; k, v: [..., Skv, D]; mask: bool, broadcastable to
  [..., Sq, Skv] (True = attend); bias: [..., Sq, Skv] or None.
  Differentiable with jax.grad (used as the gradient reference).
  """
  s = jnp.einsum("...qd,...kd->...qk", q.astype(jnp.float32),
                 k.astype(jnp.float32), precision=HIGHEST)
  if bias is not None:
    s = s + bias.astype(jnp.float32)
  s = s * sm_scale
  if mask is not None:
    s = jnp.where(mask, s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  return jnp.einsum("...qk,...kd->...qd", p, v.astype(jnp.float32),
                    precision=HIGHEST)


def contiguous_segment_ids(r, batch, seq_len, num_segments):
  """[batch, seq_len] int32 ids of `num_segments` contiguous random segments."""
  ids = np.zeros((batch, seq_len), np.int32)
  for b in range(batch):
    cuts = np.sort(r.choice(np.arange(1, seq_len), num_segments - 1,
                            replace=False))
    ids[b] = np.searchsorted(cuts, np.arange(seq_len), side="right")
  return ids


# ---------------------------------------------------------------------------
# flash_attention (ops/tpu/flash_attention.py)


def flash_mask(batch, q_len, kv_len, *, causal, segment_ids):
  """[B, 1, Sq, Skv] bool mask (or None): causal = col <= row, same segment."""
  mask = np.ones((batch, 1, q_len, kv_len), bool)
  if causal:
    mask &= (np.arange(kv_len)[None, :] <= np.arange(q_len)[:, None])
  if segment_ids is not None:
    mask &= (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
  return mask


def _flash_block_sizes(block_q, block_k_major, block_k, block_b):
  return flash_lib.BlockSizes(
      block_q=block_q, block_k_major=block_k_major, block_k=block_k,
      block_b=block_b,
      block_q_major_dkv=block_q, block_k_major_dkv=block_k_major,
      block_k_dkv=block_k, block_q_dkv=block_q,
      block_k_major_dq=block_k_major, block_k_dq=block_k, block_q_dq=block_q,
  )


def _flash_case(name, *, batch=1, heads=2, q_len=256, kv_len=None,
                head_dim=64, causal=False, segments=False, bias=False,
                blocks=(128, 128, 128, 1), dtype=jnp.float32, sm_scale=None):
  return dict(testcase_name=name, batch=batch, heads=heads, q_len=q_len,
              kv_len=q_len if kv_len is None else kv_len, head_dim=head_dim,
              causal=causal, segments=segments, bias=bias, blocks=blocks,
              dtype=dtype, sm_scale=sm_scale)

# Forward grid: (batch / block_b, heads, q_len / block_q,
#                kv_len / block_k_major).
_FLASH_CASES = [
    _flash_case("noncausal_s256_grid8"),
    _flash_case("causal_s256_grid8", causal=True),
    _flash_case("segments_s256_grid8", segments=True),
    _flash_case("causal_segments_s256_grid8", causal=True, segments=True),
    _flash_case("causal_b2_s512_d128_grid64", batch=2, q_len=512,
                head_dim=128, causal=True),
    _flash_case("segments_s512_kmajor256_grid16", q_len=512, segments=True,
                blocks=(128, 256, 128, 1), sm_scale=1.0),
    _flash_case("bias_causal_s256", causal=True, bias=True),
    _flash_case("cross_q256_kv128_single_kv_step", kv_len=128),
    _flash_case("block_b2_causal_b2_s256", batch=2, causal=True,
                blocks=(128, 128, 128, 2)),
    _flash_case("bf16_causal_segments_s256", causal=True, segments=True,
                dtype=jnp.bfloat16),
]

_FLASH_SLOW_CASES = [
    _flash_case("causal_segments_b2h4_s1024_d128_grid512", batch=2, heads=4,
                q_len=1024, head_dim=128, causal=True, segments=True),
    _flash_case("noncausal_b2h2_s2048_kmajor512_grid128", batch=2, q_len=2048,
                head_dim=128, blocks=(256, 512, 256, 1)),
]

# Gradients: dkv grid (B, H, kv / bk_major, q / bq) and dq grid
# (B, H, q / bq, kv / bk_major).
_FLASH_GRAD_CASES = [
    _flash_case("noncausal_s256"),
    _flash_case("causal_s256", causal=True),
    _flash_case("segments_s256", segments=True),
    _flash_case("causal_segments_s256", causal=True, segments=True),
    _flash_case("causal_segments_s512_grid32", q_len=512, causal=True,
                segments=True, sm_scale=1.0),
    _flash_case("causal_b2_s512_kmajor256_grid32", batch=2, q_len=512,
                causal=True, blocks=(128, 256, 128, 1)),
    _flash_case("bias_noncausal_s256", bias=True),
]

_FLASH_GRAD_SLOW_CASES = [
    _flash_case("causal_segments_b2h4_s1024_d128_grid512", batch=2, heads=4,
                q_len=1024, head_dim=128, causal=True, segments=True),
]


class FlashAttentionTest(test_util.KernelTestCase):

  def _inputs(self, batch, heads, q_len, kv_len, head_dim, segments, bias,
              dtype, seed=0):
    r = test_util.rng(seed)
    q = test_util.normal(r, (batch, heads, q_len, head_dim), dtype)
    k = test_util.normal(r, (batch, heads, kv_len, head_dim), dtype)
    v = test_util.normal(r, (batch, heads, kv_len, head_dim), dtype)
    ab = (test_util.normal(r, (batch, heads, q_len, kv_len), dtype)
          if bias else None)
    seg = None
    if segments:
      assert q_len == kv_len
      seg = contiguous_segment_ids(r, batch, q_len, num_segments=3)
    return q, k, v, ab, seg

  def _call(self, q, k, v, ab, seg, causal, sm_scale, blocks):
    segment_ids = (None if seg is None
                   else flash_lib.SegmentIds(q=jnp.asarray(seg),
                                             kv=jnp.asarray(seg)))
    return flash_lib.flash_attention(
        q, k, v, ab, segment_ids, causal=causal, sm_scale=sm_scale,
        block_sizes=_flash_block_sizes(*blocks))

  @parameterized.named_parameters(*_FLASH_CASES)
  def test_forward(self, **kw):
    self._check_forward(**kw)

  @parameterized.named_parameters(*_FLASH_SLOW_CASES)
  @slow
  def test_forward_large(self, **kw):
    self._check_forward(**kw)

  def _check_forward(self, batch, heads, q_len, kv_len, head_dim, causal,
                     segments, bias, blocks, dtype, sm_scale):
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    q, k, v, ab, seg = self._inputs(batch, heads, q_len, kv_len, head_dim,
                                    segments, bias, dtype)
    out = self.run_kernel(
        lambda: self._call(q, k, v, ab, seg, causal, sm_scale, blocks))
    self.assertEqual(out.shape, q.shape)
    self.assertEqual(out.dtype, q.dtype)
    mask = flash_mask(batch, q_len, kv_len, causal=causal, segment_ids=seg)
    expected = attention_reference(q, k, v, mask, bias=ab, sm_scale=sm_scale)
    self.assert_close(out, expected)

  @parameterized.named_parameters(*_FLASH_GRAD_CASES)
  def test_gradient(self, **kw):
    self._check_gradient(**kw)

  @parameterized.named_parameters(*_FLASH_GRAD_SLOW_CASES)
  @slow
  def test_gradient_large(self, **kw):
    self._check_gradient(**kw)

  def _check_gradient(self, batch, heads, q_len, kv_len, head_dim, causal,
                      segments, bias, blocks, dtype, sm_scale):
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    q, k, v, ab, seg = self._inputs(batch, heads, q_len, kv_len, head_dim,
                                    segments, bias, dtype, seed=1)
    do = test_util.normal(test_util.rng(2), q.shape, jnp.float32)
    mask = flash_mask(batch, q_len, kv_len, causal=causal, segment_ids=seg)
    argnums = (0, 1, 2, 3) if bias else (0, 1, 2)

    def kernel_loss(q, k, v, ab):
      out = self._call(q, k, v, ab, seg, causal, sm_scale, blocks)
      return jnp.sum(out.astype(jnp.float32) * do)

    def reference_loss(q, k, v, ab):
      out = attention_reference(q, k, v, mask, bias=ab, sm_scale=sm_scale)
      return jnp.sum(out * do)

    grads = self.run_kernel(
        lambda: jax.grad(kernel_loss, argnums=argnums)(q, k, v, ab))
    expected = jax.jit(jax.grad(reference_loss, argnums=argnums))(q, k, v, ab)
    for name, g, e in zip(("dq", "dk", "dv", "dab"), grads, expected):
      self.assertEqual(g.shape, e.shape, name)
      self.assert_close(g, e, err_msg=name)

  @parameterized.named_parameters(
      dict(testcase_name="causal_segments", causal=True, segments=True),
      dict(testcase_name="bias", causal=False, segments=False),
  )
  def test_reference_matches_module_reference(self, causal, segments):
    """Cross-check (no kernel): our reference vs flash_attention's own."""
    batch, heads, s, d = 2, 2, 128, 32
    q, k, v, ab, seg = self._inputs(batch, heads, s, s, d, segments,
                                    not segments, jnp.float32, seed=3)
    segment_ids = (None if seg is None else
                   flash_lib.SegmentIds(q=jnp.asarray(seg),
                                        kv=jnp.asarray(seg)))
    mask = flash_mask(batch, s, s, causal=causal, segment_ids=seg)
    theirs = functools.partial(flash_lib.mha_reference_no_custom_vjp,
                               causal=causal, sm_scale=0.5)

    def value_and_grads(fn):
      # fn's output and the gradient of sum(fn(q, k, v) ** 2), jitted.
      loss = lambda *a: jnp.sum(fn(*a) ** 2)
      return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(
          *a)))(q, k, v)

    with jax.default_matmul_precision("highest"):
      expected, grads_theirs = value_and_grads(
          lambda q, k, v: theirs(q, k, v, ab, segment_ids))
    ours, grads_ours = value_and_grads(
        lambda q, k, v: attention_reference(q, k, v, mask, bias=ab,
                                            sm_scale=0.5))
    self.assert_close(ours, expected)
    for g, e in zip(grads_ours, grads_theirs):
      self.assert_close(g, e)


# ---------------------------------------------------------------------------
# splash attention (ops/tpu/splash_attention)


def splash_mask_reference(kind, q_len, kv_len, window=None):
  """Dense [Sq, Skv] bool mask written from the definitions, not the library.

  causal: kv <= q.  local (window = (left, right)): q - left <= kv <= q + right.
  """
  qi = np.arange(q_len)[:, None]
  ki = np.arange(kv_len)[None, :]
  if kind == "causal":
    return ki <= qi
  if kind == "local":
    left, right = window
    return (qi - left <= ki) & (ki <= qi + right)
  raise ValueError(kind)


def _splash_case(name, *, mask="causal", window=None, heads=2, kv_heads=None,
                 seq_len=256, head_dim=64, batch=None, segments=False,
                 block_q=128, block_kv=128, block_kv_compute=None,
                 fused_bwd=False, dtype=jnp.float32):
  return dict(testcase_name=name, mask=mask, window=window, heads=heads,
              kv_heads=heads if kv_heads is None else kv_heads,
              seq_len=seq_len, head_dim=head_dim, batch=batch,
              segments=segments, block_q=block_q, block_kv=block_kv,
              block_kv_compute=block_kv_compute or block_kv,
              fused_bwd=fused_bwd, dtype=dtype)

# Forward grid: (heads, seq_len / block_q, seq_len / block_kv).
_SPLASH_CASES = [
    _splash_case("causal_s256_grid8"),
    _splash_case("local_left100_s256_grid8", mask="local", window=(100, 0)),
    _splash_case("local_two_sided_s512_grid32", mask="local", window=(70, 40),
                 seq_len=512),
    _splash_case("causal_s512_d128_grid32", seq_len=512, head_dim=128),
    _splash_case("causal_gqa_h4_kv2", heads=4, kv_heads=2),
    _splash_case("causal_segments", segments=True),
    _splash_case("local_kv256_compute128", mask="local", window=(128, 0),
                 seq_len=512, block_kv=256, block_kv_compute=128),
    _splash_case("causal_vmap_batch2", batch=2),
    _splash_case("causal_bf16", dtype=jnp.bfloat16),
]

_SPLASH_SLOW_CASES = [
    _splash_case("causal_h4_s2048_d128_grid1024", heads=4, seq_len=2048,
                 head_dim=128),
    _splash_case("local_h4_s2048_grid1024", mask="local", window=(256, 0),
                 heads=4, seq_len=2048, head_dim=128),
]

_SPLASH_GRAD_CASES = [
    _splash_case("causal_s256"),
    _splash_case("local_left100_s256", mask="local", window=(100, 0)),
    _splash_case("local_two_sided_s512_grid32", mask="local", window=(70, 40),
                 seq_len=512),
    _splash_case("causal_gqa_h4_kv2", heads=4, kv_heads=2),
    _splash_case("causal_segments", segments=True),
    _splash_case("causal_fused_bwd", fused_bwd=True),
    _splash_case("local_fused_bwd_s512", mask="local", window=(100, 20),
                 seq_len=512, fused_bwd=True),
]

_SPLASH_GRAD_SLOW_CASES = [
    _splash_case("causal_h4_s2048_d128", heads=4, seq_len=2048, head_dim=128),
]


# jax 0.10.2's TPU interpret mode fails on a vmapped splash kernel: batching
# adds a grid axis but not a dimension_semantics entry, and its grid-point
# randomisation zips the two (interpret_pallas_call.py, at trace time).
SPLASH_VMAP_KNOWN_FAILURES = {
    "tpu": "safe_zip() argument 1 has length 3 but argument 0 has length 4",
}


class SplashAttentionTest(test_util.KernelTestCase):

  def _make(self, mask, window, heads, seq_len, block_q, block_kv,
            block_kv_compute, fused_bwd):
    shape = (seq_len, seq_len)
    if mask == "causal":
      head_mask = splash_lib.CausalMask(shape=shape)
    else:
      head_mask = splash_lib.LocalMask(shape=shape, window_size=window,
                                       offset=0)
    multi = splash_lib.MultiHeadMask([head_mask] * heads)
    bwd = dict(block_q_dkv=block_q, block_kv_dkv=block_kv,
               block_kv_dkv_compute=block_kv_compute)
    if not fused_bwd:
      bwd.update(block_q_dq=block_q, block_kv_dq=block_kv)
    block_sizes = splash_lib.BlockSizes(
        block_q=block_q, block_kv=block_kv,
        block_kv_compute=block_kv_compute, use_fused_bwd_kernel=fused_bwd,
        **bwd)
    return splash_lib.make_splash_mha(
        multi, block_sizes=block_sizes, head_shards=1, q_seq_shards=1)

  def _inputs(self, heads, kv_heads, seq_len, head_dim, batch, segments,
              dtype, seed):
    r = test_util.rng(seed)
    lead = () if batch is None else (batch,)
    # Splash applies no softmax scale: fold 1/sqrt(d) into q.
    q = test_util.normal(r, (*lead, heads, seq_len, head_dim), dtype,
                         scale=head_dim ** -0.5)
    k = test_util.normal(r, (*lead, kv_heads, seq_len, head_dim), dtype)
    v = test_util.normal(r, (*lead, kv_heads, seq_len, head_dim), dtype)
    seg = (contiguous_segment_ids(r, 1, seq_len, num_segments=3)[0]
           if segments else None)
    return q, k, v, seg

  def _run(self, kernel, q, k, v, seg, batch):
    segment_ids = (None if seg is None else
                   splash_lib.SegmentIds(q=jnp.asarray(seg),
                                         kv=jnp.asarray(seg)))
    fn = lambda q, k, v: kernel(q, k, v, segment_ids=segment_ids)
    if batch is not None:
      fn = jax.vmap(fn)
    return fn(q, k, v)

  def _reference(self, q, k, v, seg, mask, window):
    heads, kv_heads, seq_len = q.shape[-3], k.shape[-3], q.shape[-2]
    dense = splash_mask_reference(mask, seq_len, seq_len, window)
    if seg is not None:
      dense = dense & (seg[:, None] == seg[None, :])
    # Grouped-query: q head h reads kv head h // (heads / kv_heads).
    k = jnp.repeat(k, heads // kv_heads, axis=-3)
    v = jnp.repeat(v, heads // kv_heads, axis=-3)
    return attention_reference(q, k, v, dense)

  def _check_forward(self, mask, window, heads, kv_heads, seq_len, head_dim,
                     batch, segments, block_q, block_kv, block_kv_compute,
                     fused_bwd, dtype):
    kernel = self._make(mask, window, heads, seq_len, block_q, block_kv,
                        block_kv_compute, fused_bwd)
    q, k, v, seg = self._inputs(heads, kv_heads, seq_len, head_dim, batch,
                                segments, dtype, seed=4)
    out = self.run_kernel(lambda: self._run(kernel, q, k, v, seg, batch),
                          known_failures=SPLASH_VMAP_KNOWN_FAILURES
                          if batch is not None else None)
    self.assertEqual(out.shape, q.shape)
    self.assertEqual(out.dtype, q.dtype)
    self.assert_close(out, self._reference(q, k, v, seg, mask, window))

  @parameterized.named_parameters(*_SPLASH_CASES)
  def test_forward(self, **kw):
    self._check_forward(**kw)

  @parameterized.named_parameters(*_SPLASH_SLOW_CASES)
  @slow
  def test_forward_large(self, **kw):
    self._check_forward(**kw)

  def _check_gradient(self, mask, window, heads, kv_heads, seq_len, head_dim,
                      batch, segments, block_q, block_kv, block_kv_compute,
                      fused_bwd, dtype):
    kernel = self._make(mask, window, heads, seq_len, block_q, block_kv,
                        block_kv_compute, fused_bwd)
    q, k, v, seg = self._inputs(heads, kv_heads, seq_len, head_dim, batch,
                                segments, dtype, seed=5)
    do = test_util.normal(test_util.rng(6), q.shape, jnp.float32)

    def kernel_loss(q, k, v):
      out = self._run(kernel, q, k, v, seg, batch)
      return jnp.sum(out.astype(jnp.float32) * do)

    def reference_loss(q, k, v):
      return jnp.sum(self._reference(q, k, v, seg, mask, window) * do)

    grads = self.run_kernel(
        lambda: jax.grad(kernel_loss, argnums=(0, 1, 2))(q, k, v))
    expected = jax.jit(jax.grad(reference_loss, argnums=(0, 1, 2)))(q, k, v)
    for name, g, e in zip(("dq", "dk", "dv"), grads, expected):
      self.assertEqual(g.shape, e.shape, name)
      self.assert_close(g, e, err_msg=name)

  @parameterized.named_parameters(*_SPLASH_GRAD_CASES)
  def test_gradient(self, **kw):
    self._check_gradient(**kw)

  @parameterized.named_parameters(*_SPLASH_GRAD_SLOW_CASES)
  @slow
  def test_gradient_large(self, **kw):
    self._check_gradient(**kw)

  @parameterized.named_parameters(
      dict(testcase_name="causal", mask="causal", window=None),
      dict(testcase_name="local", mask="local", window=(70, 40)),
  )
  def test_mask_reference_matches_library(self, mask, window):
    """Cross-check (no kernel): our dense mask vs the library's mask objects."""
    shape = (256, 384)
    if mask == "causal":
      lib = splash_lib.CausalMask(shape=shape)
    else:
      lib = splash_lib.LocalMask(shape=shape, window_size=window, offset=0)
    np.testing.assert_array_equal(
        lib[:, :], splash_mask_reference(mask, *shape, window))


if __name__ == "__main__":
  absltest.main()
