"""Multi-device kernels under fast interpret: remote DMAs, signals, barriers.

Kernels run inside ``jax.shard_map`` over simulated CPU devices (8, set by
tests/conftest.py under pytest, or below when this file runs alone). Covers
the collectives of the Pallas TPU distributed guide (right permute, ring
all-gather, all-reduce and reduce-scatter with double buffering, the
bidirectional variants) and ``jax.experimental.pallas.ops.tpu.all_gather``,
checked against XLA's own ``lax`` collectives; device ids as mesh tuples,
dicts and logical ids; multi-axis meshes; devices taking different branches
around remote copies; while loops with a device-dependent trip count; and
the errors a wrong kernel gets (unmatched waits, leftover signals, a target
outside the mesh, a barrier without ``collective_id``).

Run:  python -m pytest tests/multidevice_test.py -q
"""

import functools
import re

import jax

try:  # Alone (as Bazel runs it): ask for devices before the backend starts.
  jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:  # Under pytest, tests/conftest.py already did.
  pass

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import absltest
from absl.testing import parameterized
import chex
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import all_gather as ops_all_gather
import jax.numpy as jnp
import numpy as np

import fast_interpret
from fast_interpret import interpreter
from fast_interpret import remote
from benchmarks import collective_kernels as ck

try:
  from tests import test_util  # pylint: disable=g-import-not-at-top
  from tests.feature_util import setUpModule  # pylint: disable=unused-import
except ImportError:
  import test_util  # pylint: disable=g-import-not-at-top
  from feature_util import setUpModule  # pylint: disable=unused-import

P = jax.sharding.PartitionSpec
FI = fast_interpret.FastInterpretParams()
ANY = pl.BlockSpec(memory_space=pl.ANY)
VMEM = pl.BlockSpec(memory_space=pltpu.VMEM)
DMA = pltpu.SemaphoreType.DMA
REGULAR = pltpu.SemaphoreType.REGULAR
MESH = pl.DeviceIdType.MESH
LOGICAL = pl.DeviceIdType.LOGICAL
SEM_ERROR = "fast_interpret: semaphore: "


def _mesh(shape, names):
  n = int(np.prod(shape))
  if jax.device_count() < n:
    raise absltest.SkipTest(f"needs {n} devices, JAX has {jax.device_count()}")
  return jax.sharding.Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def _data(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).standard_normal(shape),
                     jnp.float32)


def _shard(f, mesh, in_specs, out_specs):
  return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


def _ring(n):
  return [(i, (i + 1) % n) for i in range(n)]


class CollectivesTest(chex.TestCase):
  """The guide's collectives, against XLA's lax collectives."""

  def _compare(self, kernel, reference, mesh, in_specs, out_specs, x,
               exact=True):
    got = self.variant(_shard(kernel, mesh, in_specs, out_specs))(x)
    want = jax.jit(_shard(reference, mesh, in_specs, out_specs))(x)
    if exact:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    else:
      np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                 rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("mesh_tuple_4", 4, 1, "mesh"), ("dict_left_4", 4, -1, "dict"),
      ("logical_4", 4, 1, "logical"), ("mesh_tuple_8", 8, 1, "mesh"))
  def test_right_permute(self, n, shift, form):
    mesh = _mesh((n,), ("x",))
    perm = [(i, (i + shift) % n) for i in range(n)]
    self._compare(
        functools.partial(ck.right_permute, axis="x", n=n, shift=shift,
                          form=form, interpret=FI),
        lambda v: lax.ppermute(v, "x", perm), mesh, P("x"), P("x"),
        _data((8 * n, 128)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("ring_4", 4, False),
                                  ("bidirectional_4", 4, True),
                                  ("ring_8", 8, False))
  def test_all_gather(self, n, bidirectional):
    mesh = _mesh((n,), ("x",))
    self._compare(
        functools.partial(ck.ring_all_gather, axis="x", n=n,
                          bidirectional=bidirectional, interpret=FI),
        lambda v: lax.all_gather(v, "x"), mesh, P("x"), P("x"),
        _data((8 * n, 128)))

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(("devices_4", 4), ("devices_8", 8))
  def test_all_reduce(self, n):
    mesh = _mesh((n,), ("x",))
    self._compare(
        functools.partial(ck.ring_all_reduce, axis="x", n=n, interpret=FI),
        lambda v: lax.psum(v, "x"), mesh, P("x"), P("x"),
        _data((8 * n, 128)), exact=False)

  @chex.variants(with_jit=True)
  @parameterized.named_parameters(("ring_4", 4, False),
                                  ("bidirectional_4", 4, True),
                                  ("bidirectional_8", 8, True))
  def test_reduce_scatter(self, n, bidirectional):
    mesh = _mesh((n,), ("x",))
    self._compare(
        functools.partial(ck.ring_reduce_scatter, axis="x", n=n,
                          bidirectional=bidirectional, interpret=FI),
        lambda v: lax.psum_scatter(v, "x"), mesh, P(None, None, "x"),
        P(None, "x"), _data((n, 16, 128 * n)), exact=False)

  @parameterized.named_parameters(("devices_4", 4), ("devices_8", 8))
  def test_pallas_ops_all_gather(self, n):
    mesh = _mesh((n,), ("x",))
    x = _data((8 * n, 128))
    with fast_interpret.force_fast_interpret_mode(FI):
      got = ops_all_gather.all_gather(x, mesh=mesh, axis_name="x")
    want = jax.jit(_shard(lambda v: lax.all_gather(v, "x", tiled=True), mesh,
                          P("x"), P(None)))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  @test_util.slow
  def test_guide_collectives_on_8_devices_slow(self):
    mesh = _mesh((8,), ("x",))
    x = _data((8, 32, 128 * 8))
    for bidirectional in (False, True):
      got = jax.jit(_shard(functools.partial(
          ck.ring_reduce_scatter, axis="x", n=8, bidirectional=bidirectional,
          interpret=FI), mesh, P(None, None, "x"), P(None, "x")))(x)
      want = jax.jit(_shard(lambda v: lax.psum_scatter(v, "x"), mesh,
                            P(None, None, "x"), P(None, "x")))(x)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want),
                                 rtol=1e-5, atol=1e-5)


# --- Device ids on a 2-D mesh, signals, divergent control flow. ------------


def _two_axis_kernel(x_hbm, along_y, along_x, logical, send_sems, recv_sems):
  i, j = lax.axis_index("x"), lax.axis_index("y")
  targets = [({"y": lax.rem(j + 1, 4)}, MESH), ((1 - i, j), MESH),
             (i * 4 + lax.rem(j + 3, 4), LOGICAL)]
  copies = [pltpu.make_async_remote_copy(
      x_hbm, out, send_sems.at[k], recv_sems.at[k], device_id=device_id,
      device_id_type=id_type)
            for k, (out, (device_id, id_type)) in enumerate(
                zip((along_y, along_x, logical), targets))]
  for copy in copies:
    copy.start()
  for copy in copies:
    copy.wait()


def _signal_kernel(o_ref, sem):
  """Each device adds (its id + 1) to its right neighbour's semaphore."""
  me = lax.axis_index("x")
  n = lax.axis_size("x")
  pl.semaphore_signal(sem, me + 1, device_id=(lax.rem(me + 1, n),),
                      device_id_type=MESH)
  o_ref[0] = pl.semaphore_read(sem)
  pl.semaphore_wait(sem, o_ref[0])


def _pairs_kernel(x_ref, o_ref, send_sem, recv_sem):
  """0 sends to 1; 2 and 3 swap; the rest keep their own: branches differ."""
  me = lax.axis_index("x")

  def copy_to(device):
    return pltpu.make_async_remote_copy(x_ref, o_ref, send_sem, recv_sem,
                                        device_id=device,
                                        device_id_type=LOGICAL)

  @pl.when((me == 0) | (me >= 4))
  def _():
    o_ref[...] = x_ref[...]

  @pl.when(me == 0)
  def _():
    copy = copy_to(1)
    copy.start()
    copy.wait_send()

  @pl.when(me == 1)
  def _():
    copy_to(1).wait_recv()

  for sender, receiver in ((2, 3), (3, 2)):
    @pl.when(me == sender)
    def _(sender=sender, receiver=receiver):
      copy = copy_to(receiver)
      copy.start()
      copy.wait_send()
      copy_to(sender).wait_recv()  # The copy the other one starts.


def _broadcast_kernel(x_ref, o_ref, send_sem, recv_sem):
  """Only device 0 sends, to every other device, in a loop."""
  me = lax.axis_index("x")
  n = lax.axis_size("x")

  def copy_to(device):
    return pltpu.make_async_remote_copy(x_ref, o_ref, send_sem, recv_sem,
                                        device_id=device,
                                        device_id_type=LOGICAL)

  @pl.when(me == 0)
  def _():
    o_ref[...] = x_ref[...]

    @pl.loop(1, n)
    def _(device):
      copy = copy_to(device)
      copy.start()
      copy.wait_send()

  @pl.when(me != 0)
  def _():
    copy_to(me).wait_recv()


def _uneven_loop_kernel(x_ref, o_ref, send_sem, recv_sem):
  """Device d adds its x into its right neighbour d times: uneven while loops."""
  me = lax.axis_index("x")
  n = lax.axis_size("x")
  right, left = lax.rem(me + 1, n), lax.rem(me + n - 1, n)
  o_ref[...] = jnp.zeros_like(o_ref)
  barrier = pltpu.get_barrier_semaphore()  # Our o_ref is zero: send away.
  pl.semaphore_signal(barrier, 1, device_id=(left,), device_id_type=MESH)
  pl.semaphore_wait(barrier, 1)
  copy = pltpu.make_async_remote_copy(x_ref, o_ref, send_sem, recv_sem,
                                      device_id=(right,), device_id_type=MESH)

  def send(i, carry):
    copy.start(add=True)
    copy.wait_send()
    return carry

  lax.fori_loop(0, me, send, 0)

  def receive(i, carry):
    copy.wait_recv()
    return carry

  lax.fori_loop(0, left, receive, 0)


class DeviceIdsAndBranchesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_axis_mesh(self):
    mesh = _mesh((2, 4), ("x", "y"))
    spec = P(("x", "y"))
    x = _data((8 * 8, 128))

    def kernel(v):
      shape = jax.ShapeDtypeStruct(v.shape, v.dtype)
      return pl.pallas_call(
          _two_axis_kernel, out_shape=(shape,) * 3, in_specs=[ANY],
          out_specs=(ANY,) * 3, scratch_shapes=[DMA((3,)), DMA((3,))],
          interpret=FI)(v)

    def reference(v):
      return (lax.ppermute(v, "y", _ring(4)),
              lax.ppermute(v, "x", [(0, 1), (1, 0)]),
              lax.ppermute(v, "y", [(j, (j + 3) % 4) for j in range(4)]))

    got = self.variant(_shard(kernel, mesh, spec, (spec,) * 3))(x)
    want = jax.jit(_shard(reference, mesh, spec, (spec,) * 3))(x)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

  @chex.variants(with_jit=True, without_jit=True)
  def test_remote_signal_reaches_neighbour(self):
    n = 4
    mesh = _mesh((n,), ("x",))
    kernel = pl.pallas_call(
        _signal_kernel, out_shape=jax.ShapeDtypeStruct((1,), jnp.int32),
        out_specs=pl.BlockSpec(memory_space=pltpu.SMEM),
        scratch_shapes=[REGULAR], interpret=FI)
    got = self.variant(_shard(kernel, mesh, (), P("x")))()
    # Device d hears from d - 1, which adds its own id + 1 = d (n for d=0).
    np.testing.assert_array_equal(np.asarray(got), [n, 1, 2, 3])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("devices_4", 4), ("devices_8", 8))
  def test_devices_take_different_branches(self, n):
    mesh = _mesh((n,), ("x",))
    x = _data((8 * n, 128))
    kernel = pl.pallas_call(
        _pairs_kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[VMEM], out_specs=VMEM, scratch_shapes=[DMA, DMA],
        interpret=FI)
    got = self.variant(_shard(kernel, mesh, P("x"), P("x")))(x)
    shards = np.asarray(x).reshape(n, 8, 128)
    want = shards[[0, 0, 3, 2, *range(4, n)]].reshape(8 * n, 128)
    np.testing.assert_array_equal(np.asarray(got), want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_only_device_0_sends(self):
    n = 4
    mesh = _mesh((n,), ("x",))
    x = _data((8 * n, 128))
    kernel = pl.pallas_call(
        _broadcast_kernel,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[VMEM], out_specs=VMEM, scratch_shapes=[DMA, DMA],
        interpret=FI)
    got = self.variant(_shard(kernel, mesh, P("x"), P("x")))(x)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.tile(np.asarray(x)[:8], (n, 1)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_device_dependent_while_loops(self):
    n = 4
    mesh = _mesh((n,), ("x",))
    x = _data((8 * n, 128))
    kernel = pl.pallas_call(
        _uneven_loop_kernel,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[VMEM], out_specs=VMEM, scratch_shapes=[DMA, DMA],
        compiler_params=pltpu.CompilerParams(collective_id=0), interpret=FI)
    got = self.variant(_shard(kernel, mesh, P("x"), P("x")))(x)
    shards = np.asarray(x).reshape(n, 8, 128)
    left = [(d - 1) % n for d in range(n)]
    want = np.concatenate([shards[l] * l for l in left])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


# --- How remote ops are exchanged: ppermute or all-gather. -----------------


def _collectives(text):
  """(op, elements of the result) of each collective in lowered StableHLO."""
  found = []
  for line in text.splitlines():
    m = re.search(r'"stablehlo\.(collective_permute|all_gather)".*-> '
                  r'tensor<([0-9x]*)x?[a-z]+[0-9]*>', line)
    if m:
      dims = [int(d) for d in m.group(2).split("x") if d]
      found.append((m.group(1), int(np.prod(dims))))
  return found


def _copy_kernel(target_of, copies_in, when=None, slot_of=None):
  """A kernel: ``x`` to ``o`` (at ``slot_of(me)``) of ``target_of(me)``.

  ``when(me)`` (if given) says which devices send; every device first copies
  its own ``x`` into each slot of ``o``, then waits for the ``copies_in(me)``
  copies it gets.
  """
  def kernel(x_ref, o_ref, send_sem, recv_sem):
    me = lax.axis_index("x")
    for k in range(o_ref.shape[0]):
      o_ref[k] = x_ref[...]
    dst = o_ref.at[0 if slot_of is None else slot_of(me)]
    copy = pltpu.make_async_remote_copy(
        x_ref, dst, send_sem, recv_sem, device_id=(target_of(me),),
        device_id_type=MESH)

    @pl.when(True if when is None else when(me))
    def _():
      copy.start()
      copy.wait_send()

    def wait(i, carry):
      copy.wait_recv()
      return carry

    lax.fori_loop(0, jnp.asarray(copies_in(me), jnp.int32), wait, 0)
  return kernel


def _copy_call(kernel, slots=1):
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((slots, 8, 128), jnp.float32),
      in_specs=[VMEM], out_specs=VMEM, scratch_shapes=[DMA, DMA],
      interpret=fast_interpret.params_for_level("fast"))


class ExchangeTest(chex.TestCase):
  """Static permutations go through ppermute; the rest through all_gather."""

  def _run(self, call, mesh, x, spec=P("x")):
    f = _shard(call, mesh, spec, spec)
    text = jax.jit(f).lower(x).as_text()
    return np.asarray(self.variant(f)(x)), _collectives(text)

  def assertPermutesPayload(self, collectives, payload=8 * 128):
    self.assertIn("collective_permute", [op for op, _ in collectives])
    self.assertEqual(
        [], [c for c in collectives if c[0] == "all_gather"
             and c[1] >= payload])

  def assertGathersPayload(self, collectives, devices, payload=8 * 128):
    self.assertEqual([], [c for c in collectives
                          if c[0] == "collective_permute"])
    self.assertTrue(any(op == "all_gather" and size >= devices * payload
                        for op, size in collectives), collectives)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("mesh_tuple", "mesh"), ("dict", "dict"),
                                  ("logical", "logical"))
  def test_static_ring_is_a_ppermute(self, form):
    n = 8
    mesh = _mesh((n,), ("x",))
    x = _data((8 * n, 128))
    call = functools.partial(ck.right_permute, axis="x", n=n, shift=3,
                             form=form,
                             interpret=fast_interpret.params_for_level("fast"))
    got, collectives = self._run(call, mesh, x)
    want = jax.jit(_shard(
        lambda v: lax.ppermute(v, "x", [(i, (i + 3) % n) for i in range(n)]),
        mesh, P("x"), P("x")))(x)
    np.testing.assert_array_equal(got, np.asarray(want))
    self.assertPermutesPayload(collectives)
    self.assertEqual([], [c for c in collectives if c[0] == "all_gather"])

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_devices_to_one_is_gathered(self):
    n = 4
    mesh = _mesh((n,), ("x",))
    x = _data((8 * n, 128))
    # Devices 2d and 2d + 1 both send to d, into slots 0 and 1.
    call = _copy_call(_copy_kernel(lambda me: me // 2,
                                   lambda me: jnp.where(me < n // 2, 2, 0),
                                   slot_of=lambda me: lax.rem(me, 2)), slots=2)
    got, collectives = self._run(call, mesh, x)
    shards = np.asarray(x).reshape(n, 8, 128)
    want = np.stack([shards, shards], axis=1)  # Each keeps its own...
    for d in range(n):
      want[d // 2, d % 2] = shards[d]  # ... unless someone sent it theirs.
    np.testing.assert_array_equal(got, want.reshape(n * 2, 8, 128))
    self.assertGathersPayload(collectives, n)

  @chex.variants(with_jit=True, without_jit=True)
  def test_target_read_from_memory_is_gathered(self):
    n = 4
    mesh = _mesh((n,), ("x",))
    x = _data((8 * n, 128))
    shift = np.roll(np.arange(n, dtype=np.int32), -1)  # Device d -> d + 1.

    def kernel(table_ref, x_ref, o_ref, send_sem, recv_sem):
      copy = pltpu.make_async_remote_copy(
          x_ref, o_ref, send_sem, recv_sem,
          device_id=(table_ref[lax.axis_index("x")],), device_id_type=MESH)
      copy.start()
      copy.wait()

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), VMEM],
        out_specs=VMEM, scratch_shapes=[DMA, DMA],
        interpret=fast_interpret.params_for_level("fast"))
    f = _shard(lambda v: call(jnp.asarray(shift), v), mesh, P("x"), P("x"))
    got = self.variant(f)(x)
    want = jax.jit(_shard(lambda v: lax.ppermute(v, "x", _ring(n)), mesh,
                          P("x"), P("x")))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    self.assertGathersPayload(_collectives(jax.jit(f).lower(x).as_text()), n)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      # Even devices send to the right; odd ones keep their own x.
      ("even_senders", lambda me, n: lax.rem(me + 1, n),
       lambda me, n: lax.rem(me, 2) == 0, lambda d, n: d % 2 == 0,
       lambda me, n: lax.rem(me, 2)),
      # No wrap-around: the last device's target is outside the mesh, but it
      # does not send; device 0 gets nothing.
      ("open_chain", lambda me, n: me + 1, lambda me, n: me < n - 1,
       lambda d, n: d < n - 1, lambda me, n: me > 0))
  def test_predicated_senders(self, target_of, when, sends, copies_in):
    n = 8
    mesh = _mesh((n,), ("x",))
    x = _data((8 * n, 128))
    call = _copy_call(_copy_kernel(lambda me: target_of(me, n),
                                   lambda me: copies_in(me, n),
                                   when=lambda me: when(me, n)))
    got, collectives = self._run(call, mesh, x)
    shards = np.asarray(x).reshape(n, 8, 128)
    want = shards.copy()
    for d in range(n):
      if sends(d, n):
        want[int(target_of(d, n))] = shards[d]
    np.testing.assert_array_equal(got, want)
    self.assertPermutesPayload(collectives)

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_axis_mesh_tuple_is_a_ppermute(self):
    mesh = _mesh((2, 4), ("x", "y"))
    spec = P(("x", "y"))
    x = _data((8 * 8, 128))

    def kernel(x_hbm, o_hbm, send_sem, recv_sem):
      i, j = lax.axis_index("x"), lax.axis_index("y")
      copy = pltpu.make_async_remote_copy(
          x_hbm, o_hbm, send_sem, recv_sem,
          device_id=(1 - i, lax.rem(j + 1, 4)), device_id_type=MESH)
      copy.start()
      copy.wait()

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[ANY], out_specs=ANY, scratch_shapes=[DMA, DMA],
        interpret=fast_interpret.params_for_level("fast"))
    perm = [(i * 4 + j, (1 - i) * 4 + (j + 1) % 4)
            for i in range(2) for j in range(4)]
    got, collectives = self._run(call, mesh, x, spec)
    want = jax.jit(_shard(lambda v: lax.ppermute(v, ("x", "y"), perm), mesh,
                          spec, spec))(x)
    np.testing.assert_array_equal(got, np.asarray(want))
    self.assertPermutesPayload(collectives)

  def test_remote_signal_is_one_packed_ppermute(self):
    n = 4
    mesh = _mesh((n,), ("x",))
    kernel = pl.pallas_call(
        _signal_kernel, out_shape=jax.ShapeDtypeStruct((1,), jnp.int32),
        out_specs=pl.BlockSpec(memory_space=pltpu.SMEM),
        scratch_shapes=[REGULAR],
        interpret=fast_interpret.params_for_level("fast"))
    text = jax.jit(_shard(kernel, mesh, (), P("x"))).lower().as_text()
    self.assertEqual([("collective_permute", 1)], _collectives(text))

  @parameterized.named_parameters(
      ("bool", np.bool_, (3,)), ("int8_odd", np.int8, (3,)),
      ("int8_words", np.int8, (2, 4)), ("uint16", np.uint16, (2,)),
      ("bfloat16_odd", jnp.bfloat16, (5,)), ("float32", np.float32, (2, 3)),
      ("int32_scalar", np.int32, ()))
  def test_words_round_trip(self, dtype, shape):
    values = [jnp.asarray(np.arange(-3, -3 + int(np.prod(shape)))
                          .reshape(shape)).astype(dtype),
              jnp.asarray(7, jnp.int32)]
    packing = remote._Packing.of(values)  # pylint: disable=protected-access
    packed, alone = packing.pack(values)
    self.assertEqual(packed.dtype, jnp.int32)
    self.assertEqual(alone, [])
    for got, want in zip(packing.unpack(packed, alone, values), values,
                         strict=True):
      self.assertEqual((got.dtype, got.shape), (want.dtype, want.shape))
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  def test_static_targets_of_arithmetic(self):
    mesh = remote.DeviceMesh(("x", "y"), (2, 4), frozenset({"x", "y"}))
    seen = {}

    def body(v):
      i, j = lax.axis_index("x"), lax.axis_index("y")
      seen["ring"] = remote.static_targets(
          mesh, (1 - i) * 4 + lax.rem(j + 3, 4))
      seen["read"] = remote.static_targets(mesh, v[0, 0].astype(jnp.int32))
      seen["div"] = remote.static_targets(mesh, j // 2 + jnp.int32(i) * 2)
      return v

    jax.jit(_shard(body, _mesh((2, 4), ("x", "y")), P(("x", "y")),
                   P(("x", "y")))).lower(_data((8, 1)))
    want = [(1 - i) * 4 + (j + 3) % 4 for i in range(2) for j in range(4)]
    np.testing.assert_array_equal(seen["ring"], want)
    self.assertIsNone(seen["read"])
    np.testing.assert_array_equal(
        seen["div"], [j // 2 + i * 2 for i in range(2) for j in range(4)])
    self.assertEqual(remote.static_permutation(seen["div"], 8), None)
    self.assertEqual(remote.static_permutation(np.array([1, 2, 9]), 3),
                     ((0, 1), (1, 2)))

  @parameterized.named_parameters(
      # On the grid step alone: a plain branch, its wait checked at once.
      ("grid_step", lambda me, step: step == 1,
       SEM_ERROR + r"a semaphore wait on scratch\[0\] waits for more than "
       r"was signalled \(count would be -1\).*grid step 1, device 0\)"),
      # On the device: predicated, the wait checked at the end of the step.
      ("device", lambda me, step: (step == 1) & (me >= 0),
       SEM_ERROR + r"a semaphore wait on scratch\[0\] \(in a branch with "
       r"remote ops\) waits for more than was signalled by the end of the "
       r"grid step \(count -1\).*grid step 1, device 0\)"))
  def test_branch_on_grid_step_is_not_predicated(self, when, message):
    def kernel(o_ref, sem):
      me = lax.axis_index("x")

      @pl.when(when(me, pl.program_id(0)))
      def _():
        pl.semaphore_signal(sem, 1, device_id=(me,), device_id_type=MESH)
        pl.semaphore_wait(sem, 2)

      o_ref[0] = 0

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((1,), jnp.int32), grid=(2,),
        out_specs=pl.BlockSpec(memory_space=pltpu.SMEM),
        scratch_shapes=[REGULAR], interpret=FI)
    with self.assertRaisesRegex(Exception, message):
      jax.block_until_ready(jax.jit(_shard(call, _mesh((4,), ("x",)), (),
                                           P("x")))())

  def test_same_on_every_device(self):
    seen = {}

    def body(v):
      step = v[0, 0].astype(jnp.int32)  # Stands for a grid step.
      ctx = interpreter.RuleContext(
          params=None, kernel_name="k", buffer_ids=None, program_ids=(step,),
          num_programs=(4,))
      me = lax.axis_index("x")
      for name, x in [("grid", (step >= 1) & (lax.rem(step, 2) < 4 - 3)),
                      ("constant", jnp.int32(3) + 1),
                      ("device", step < me), ("memory", v[1, 0] > 0)]:
        seen[name] = remote.same_on_every_device(ctx, x)
      return v

    jax.jit(_shard(body, _mesh((4,), ("x",)), P("x"), P("x"))).lower(
        _data((8, 1)))
    self.assertEqual(seen, dict(grid=True, constant=True, device=False,
                                memory=False))


# --- Back-to-back remote ops: one exchange. ---------------------------------


def _two_copies_kernel(shifts, relay=False):
  """Device d sends x[k] to ``d + shifts[k]``'s o[k], the starts back to back.

  With ``relay``, o[0] is then forwarded once more by the first shift (a read
  of a destination between two sends: the first must land before it).
  """
  def kernel(x_ref, o_ref, send_sems, recv_sems):
    me = lax.axis_index("x")
    n = lax.axis_size("x")
    copies = [pltpu.make_async_remote_copy(
        x_ref.at[k], o_ref.at[k], send_sems.at[k], recv_sems.at[k],
        device_id=(lax.rem(me + shift + n, n),), device_id_type=MESH)
              for k, shift in enumerate(shifts)]
    for copy in copies:
      copy.start()
    for copy in copies:
      copy.wait()
    if relay:
      copy = pltpu.make_async_remote_copy(
          o_ref.at[0], x_ref.at[0], send_sems.at[0], recv_sems.at[0],
          device_id=(lax.rem(me + shifts[0] + n, n),), device_id_type=MESH)
      copy.start()
      copy.wait()
      pltpu.sync_copy(x_ref.at[0], o_ref.at[0])
  return kernel


class DeferredSendsTest(chex.TestCase):
  """Remote ops wait until something could observe them, then go together."""

  def _run(self, shifts, relay=False, n=4):
    mesh = _mesh((n,), ("x",))
    k = len(shifts)
    call = pl.pallas_call(
        _two_copies_kernel(shifts, relay),
        out_shape=jax.ShapeDtypeStruct((k, 8, 128), jnp.float32),
        in_specs=[ANY], out_specs=ANY,
        scratch_shapes=[DMA((k,)), DMA((k,))], interpret=FI)
    x = _data((n * k, 8, 128))
    f = _shard(call, mesh, P("x"), P("x"))
    got = np.asarray(self.variant(f)(x))
    shards = np.asarray(x).reshape(n, k, 8, 128)
    want = np.stack([np.roll(shards[:, j], shifts[j], axis=0)
                     for j in range(k)], axis=1)
    if relay:
      want[:, 0] = np.roll(shards[:, 0], 2 * shifts[0], axis=0)
    np.testing.assert_array_equal(got, want.reshape(n * k, 8, 128))
    return _collectives(jax.jit(f).lower(x).as_text())

  def _data_collectives(self, collectives):
    # The error word's gather after the grid is a few words.
    return [c for c in collectives if c[1] >= 8 * 128]

  @chex.variants(with_jit=True, without_jit=True)
  def test_copies_the_same_way_share_one_ppermute(self):
    collectives = self._data_collectives(self._run((1, 1)))
    self.assertEqual([op for op, _ in collectives], ["collective_permute"])
    self.assertGreaterEqual(collectives[0][1], 2 * 8 * 128)

  @chex.variants(with_jit=True, without_jit=True)
  def test_copies_two_ways_are_one_gather(self):
    collectives = self._data_collectives(self._run((1, -1)))
    self.assertEqual([op for op, _ in collectives], ["all_gather"])

  @chex.variants(with_jit=True, without_jit=True)
  def test_read_of_a_destination_delivers_first(self):
    collectives = self._data_collectives(self._run((1, 1), relay=True))
    self.assertEqual([op for op, _ in collectives],
                     ["collective_permute"] * 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_static_signals_send_nothing(self):
    def kernel(o_ref, sem):
      me = lax.axis_index("x")
      n = lax.axis_size("x")
      for shift in (1, -1, 1):
        pl.semaphore_signal(sem, 2, device_id=(lax.rem(me + shift + n, n),),
                            device_id_type=MESH)
      o_ref[0] = pl.semaphore_read(sem)
      pl.semaphore_wait(sem, 6)

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((1,), jnp.int32),
        out_specs=pl.BlockSpec(memory_space=pltpu.SMEM),
        scratch_shapes=[REGULAR], interpret=FI)
    f = _shard(call, _mesh((4,), ("x",)), (), P("x"))
    np.testing.assert_array_equal(np.asarray(self.variant(f)()), [6] * 4)
    text = jax.jit(f).lower().as_text()
    self.assertEqual([], [c for c in _collectives(text)
                          if c[0] == "collective_permute"])


class DeferredMixedTargetsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_static_and_read_targets_share_one_gather(self):
    n = 4
    mesh = _mesh((n,), ("x",))
    x = _data((2 * n, 8, 128))
    table = np.roll(np.arange(n, dtype=np.int32), 2)  # Device d -> d - 2.

    def kernel(table_ref, x_ref, o_ref, send_sems, recv_sems):
      me = lax.axis_index("x")
      targets = [lax.rem(me + 1, n), table_ref[me]]
      copies = [pltpu.make_async_remote_copy(
          x_ref.at[k], o_ref.at[k], send_sems.at[k], recv_sems.at[k],
          device_id=(t,), device_id_type=MESH) for k, t in enumerate(targets)]
      for copy in copies:
        copy.start()
      for copy in copies:
        copy.wait()

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((2, 8, 128), jnp.float32),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), VMEM],
        out_specs=VMEM, scratch_shapes=[DMA((2,)), DMA((2,))], interpret=FI)
    f = _shard(lambda v: call(jnp.asarray(table), v), mesh, P("x"), P("x"))
    got = np.asarray(self.variant(f)(x)).reshape(n, 2, 8, 128)
    shards = np.asarray(x).reshape(n, 2, 8, 128)
    np.testing.assert_array_equal(got[:, 0], np.roll(shards[:, 0], 1, axis=0))
    np.testing.assert_array_equal(got[:, 1], np.roll(shards[:, 1], 2, axis=0))
    data = [op for op, size in _collectives(jax.jit(f).lower(x).as_text())
            if size >= 8 * 128]
    self.assertEqual(data, ["all_gather"])


class DeferredAcrossBranchesTest(chex.TestCase):
  """Sends leave branches on the grid step; reads of other parts wait."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_branches_on_the_step_and_other_parts_share_one_exchange(self):
    n = 4

    def kernel(x_ref, o_ref, send_sems, recv_sems):
      me = lax.axis_index("x")
      step = pl.program_id(0)
      for k in range(2):
        # Reads o[1] after the copy into o[0] is started: another part.
        @pl.when(step == 0)
        def _():
          o_ref[k, 1] = x_ref[k] * 2

        @pl.when(step == 0)
        def _():
          pltpu.make_async_remote_copy(
              x_ref.at[k], o_ref.at[k, 0], send_sems.at[k], recv_sems.at[k],
              device_id=(lax.rem(me + 1, n),), device_id_type=MESH).start()

      @pl.when(step == 0)
      def _():
        for k in range(2):
          pltpu.make_async_remote_copy(
              x_ref.at[k], o_ref.at[k, 0], send_sems.at[k], recv_sems.at[k],
              device_id=(lax.rem(me + 1, n),), device_id_type=MESH).wait()

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((2, 2, 8, 128), jnp.float32),
        grid=(2,), in_specs=[VMEM], out_specs=VMEM,
        scratch_shapes=[DMA((2,)), DMA((2,))], interpret=FI)
    x = _data((n * 2, 8, 128))
    f = _shard(call, _mesh((n,), ("x",)), P("x"), P("x"))
    got = np.asarray(self.variant(f)(x)).reshape(n, 2, 2, 8, 128)
    shards = np.asarray(x).reshape(n, 2, 8, 128)
    np.testing.assert_array_equal(got[:, :, 0], np.roll(shards, 1, axis=0))
    np.testing.assert_array_equal(got[:, :, 1], shards * 2)
    data = [c for c in _collectives(jax.jit(f).lower(x).as_text())
            if c[1] >= 8 * 128]
    self.assertEqual(data, [("collective_permute", 2 * 8 * 128)])

  def test_bidirectional_reduce_scatter_is_one_exchange_per_step(self):
    n = 4
    mesh = _mesh((n,), ("x",))
    x = _data((n, 16, n * 128))
    call = functools.partial(ck.ring_reduce_scatter, axis="x", n=n,
                             bidirectional=True, interpret=FI)
    f = _shard(call, mesh, P(None, None, "x"), P(None, "x"))
    np.testing.assert_allclose(
        np.asarray(jax.jit(f)(x)),
        np.asarray(jax.jit(_shard(lambda v: lax.psum_scatter(v, "x"), mesh,
                                  P(None, None, "x"), P(None, "x")))(x)),
        rtol=1e-5, atol=1e-5)
    # Both directions' copies in one all-gather; signals send nothing.
    data = [op for op, size in _collectives(jax.jit(f).lower(x).as_text())
            if size >= 8 * 128]
    self.assertEqual(data, ["all_gather"])


# --- Errors. ----------------------------------------------------------------


def _permute_kernel(extra):
  def kernel(x_hbm, o_hbm, send_sem, recv_sem, sem):
    me = lax.axis_index("x")
    copy = pltpu.make_async_remote_copy(
        x_hbm, o_hbm, send_sem, recv_sem,
        device_id=(lax.rem(me + 1, lax.axis_size("x")),),
        device_id_type=MESH)
    copy.start()
    copy.wait()
    extra(me, copy, sem)
  return kernel


def _wait_twice(me, copy, sem):
  del me, sem
  copy.wait_recv()


def _signal_unmatched(me, copy, sem):
  del copy
  pl.semaphore_signal(sem, 1, device_id=(me,), device_id_type=MESH)


def _wait_in_branch(me, copy, sem):
  @pl.when(me == 3)
  def _():
    # A remote op (to itself) makes the branch predicated: its waits are
    # checked at the end of the step, and this one is never satisfied.
    pl.semaphore_signal(sem, 1, device_id=(me,), device_id_type=MESH)
    pl.semaphore_wait(sem, 1)
    copy.wait_recv()


def _outside_mesh(me, copy, sem):
  del me, copy
  pl.semaphore_signal(sem, 1, device_id=7, device_id_type=LOGICAL)


def _before_the_first_device(me, copy, sem):
  # Device 0's target is -1: ranges and static targets must not drop the
  # check because every other device's target lies in the mesh.
  del copy
  pl.semaphore_signal(sem, 1, device_id=(me - 1,), device_id_type=MESH)


def _rows_past_the_end(me, copy, sem):
  # ``me`` lies in [0, 4): the start of 8 rows of 8 is out of range on every
  # device but 0, so the check stays.
  del sem
  pltpu.sync_copy(copy.src_ref.at[pl.ds(me, 8)], copy.dst_ref)


def _left_over_before_bounds(me, copy, sem):
  # Device 1 leaves its semaphore at 1; devices 2 and 3 read rows past the
  # end. Device 1 fails first, with a count that only the end of the kernel
  # sees: its counts, not the reporter's, must be decoded.
  @pl.when(me == 1)
  def _():
    pl.semaphore_signal(sem, 1, device_id=(me,), device_id_type=MESH)

  pltpu.sync_copy(copy.src_ref.at[pl.ds(me // 2, 8)], copy.dst_ref)


class ErrorsTest(chex.TestCase):

  def _run(self, extra, n=4):
    mesh = _mesh((n,), ("x",))
    kernel = pl.pallas_call(
        _permute_kernel(extra),
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[ANY], out_specs=ANY, scratch_shapes=[DMA, DMA, REGULAR],
        interpret=FI)
    jax.block_until_ready(jax.jit(_shard(kernel, mesh, P("x"), P("x")))(
        _data((8 * n, 128))))

  @parameterized.named_parameters(
      ("wrong_wait_count", _wait_twice,
       SEM_ERROR + r"a DMA wait on scratch\[1\] waits for more than was "
       r"signalled \(count would be -4096\).*grid step 0, device 0\)"),
      ("signal_never_waited", _signal_unmatched,
       SEM_ERROR + r"scratch\[2\] is left at 1 when the kernel ends"),
      ("wait_nobody_satisfies", _wait_in_branch,
       SEM_ERROR + r"a DMA wait on scratch\[1\] \(in a branch with remote "
       r"ops\) waits for more than was signalled by the end of the grid step"
       r".*device 3\)"),
      ("target_outside_mesh", _outside_mesh,
       r"fast_interpret: remote semaphore signal: device id 7 is outside the "
       r"mesh of 4 devices"),
      ("target_before_first_device", _before_the_first_device,
       r"fast_interpret: remote semaphore signal: device id -1 is outside "
       r"the mesh of 4 devices"),
      ("rows_past_the_end", _rows_past_the_end,
       r"out of bounds: DMA source of args\[0\] at index \[1, 0\].*"
       r"device 1\)"),
      ("left_over_before_bounds", _left_over_before_bounds,
       SEM_ERROR + r"scratch\[2\] is left at 1 when the kernel ends.*"
       r"device 1\)"),
  )
  def test_runtime_error(self, extra, message):
    with self.assertRaisesRegex(Exception, message):
      self._run(extra)

  def test_barrier_needs_collective_id(self):
    def kernel(o_ref):
      sem = pltpu.get_barrier_semaphore()
      pl.semaphore_signal(sem, 1)
      pl.semaphore_wait(sem, 1)
      o_ref[0] = 0

    call = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((1,),
                                                                  jnp.int32),
                          out_specs=pl.BlockSpec(memory_space=pltpu.SMEM),
                          interpret=FI)
    with self.assertRaisesRegex(fast_interpret.UnsupportedFeatureError,
                                "get_barrier_semaphore.*collective_id=0"):
      jax.jit(call).lower()

  def test_remote_copy_outside_shard_map(self):
    def kernel(x_hbm, o_hbm, send_sem, recv_sem):
      copy = pltpu.make_async_remote_copy(x_hbm, o_hbm, send_sem, recv_sem,
                                          device_id=0, device_id_type=LOGICAL)
      copy.start()
      copy.wait()

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        in_specs=[ANY], out_specs=ANY, scratch_shapes=[DMA, DMA],
        interpret=FI)
    with self.assertRaisesRegex(fast_interpret.UnsupportedFeatureError,
                                "a remote DMA outside jax.shard_map"):
      jax.jit(call).lower(_data((8, 128)))

  def test_no_host_callback_with_checks_off(self):
    mesh = _mesh((4,), ("x",))
    off = fast_interpret.params_for_level("fast")
    self.assertFalse(off.checks_enabled)
    f = _shard(functools.partial(ck.ring_all_gather, axis="x", n=4,
                                 interpret=off), mesh, P("x"), P("x"))
    text = jax.jit(f).lower(_data((32, 128))).as_text()
    self.assertNotIn("callback", text)


if __name__ == "__main__":
  absltest.main()
