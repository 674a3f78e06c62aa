"""Remote DMAs and signals between the devices of a ``jax.shard_map``.

A kernel called inside ``jax.shard_map`` is lowered once, in the per-device
body of the SPMD program: every device runs the same compiled simulation.
We model the devices as running that program in lockstep, so a remote copy
or signal is executed by all of them at the same program point, and is
compiled as a collective over the mesh axes:

  1. Every device contributes what it sends: a valid flag (False on a device
     whose branch does not issue the op, see ``RuleContext.active``), the
     logical id of the target device, the payload, and the dynamic indices of
     the destination view and semaphore (the sender computes them, as on
     TPU).
  2. One ``all_gather`` of the int32 scalars (flag, target, scalar indices)
     and one per payload hand every device what every device sent.
  3. Each device applies, in sender order, every entry whose target is its
     own id: it writes the payload into its destination view and adds to its
     semaphore (bytes for a DMA, ``inc`` for a signal).

Fidelity: a remote write lands at the same program point on the receiver
(an eager, valid schedule of a correctly synchronised kernel); run-ahead,
races and delivery order between simultaneous senders are not modelled.
The all-gather moves mesh-size times the payload per device: cheap for the
few devices a CPU simulates.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import errors

_HINT = ("Call the kernel inside jax.shard_map over every axis of the mesh "
         "whose devices it addresses.")


@dataclasses.dataclass(frozen=True)
class DeviceMesh:
  """The devices a kernel can address: the mesh of its enclosing shard_map.

  Attributes:
    axis_names: mesh axis names, in mesh order (major to minor).
    axis_sizes: the size of each axis.
    manual_axes: the axes the shard_map made manual; a remote op needs all.
  """

  axis_names: tuple[Any, ...]
  axis_sizes: tuple[int, ...]
  manual_axes: frozenset = frozenset()

  @property
  def size(self) -> int:
    return math.prod(self.axis_sizes)

  def my_id(self) -> jax.Array:
    """This device's logical id: its mesh coordinates, row-major."""
    if not self.axis_names:
      return jnp.int32(0)
    return jnp.asarray(lax.axis_index(self.axis_names), jnp.int32)

  def gather(self, x) -> jax.Array:
    """``x`` of every device, stacked in logical-id order."""
    if not self.axis_names:
      return jnp.asarray(x)[None]
    return lax.all_gather(x, self.axis_names)

  def any(self, pred) -> jax.Array:
    """Whether ``pred`` holds on some device."""
    pred = jnp.asarray(pred, jnp.bool_)
    if not self.axis_names:
      return pred
    return lax.psum(pred.astype(jnp.int32), self.axis_names) > 0


def mesh_of(lowering_ctx) -> DeviceMesh | None:
  """The mesh of the shard_map a pallas_call is lowered in, or None."""
  found = _jax.spmd_mesh_axes(lowering_ctx)
  if found is None:
    return None
  axes, manual = found
  return DeviceMesh(tuple(n for n, _ in axes), tuple(s for _, s in axes),
                    manual)


def _require_mesh(ctx, what: str) -> DeviceMesh:
  mesh = ctx.mesh
  if mesh is None:
    raise errors.UnsupportedFeatureError(
        f"a remote {what} outside jax.shard_map", ctx.kernel_name, _HINT)
  missing = [a for a in mesh.axis_names if a not in mesh.manual_axes]
  if missing or not _jax.bound_axis_names() >= set(mesh.axis_names):
    raise errors.UnsupportedFeatureError(
        f"a remote {what} in a shard_map that leaves mesh axes {missing} "
        "automatic", ctx.kernel_name, _HINT)
  return mesh


def logical_id(ctx, device_id, device_id_type, what: str) -> jax.Array:
  """The logical id of the target of a remote op, as an int32 scalar.

  ``device_id`` is a mesh coordinate tuple, a dict from axis names (or tuples
  of them) to indices, or a logical id, as ``pltpu`` accepts; the mapping is
  JAX's own (``device_id_to_logical``), as in the Mosaic lowering.
  """
  mesh = _require_mesh(ctx, what)
  if (device_id_type == _jax.DeviceIdType.LOGICAL
      and isinstance(device_id, (tuple, list)) and len(device_id) == 1):
    device_id = device_id[0]
  strides = tuple(int(math.prod(mesh.axis_sizes[i + 1:]))
                  for i in range(len(mesh.axis_sizes)))
  info = _jax.MeshInfo(mesh.axis_sizes, mesh.axis_names, strides)
  try:
    target, other_axes = _jax.device_id_to_logical(
        info, device_id, device_id_type, lax.axis_index)
  except ValueError as e:
    raise errors.UnsupportedFeatureError(
        f"a remote {what} with device_id={device_id!r} ({e})",
        ctx.kernel_name, _HINT) from e
  if other_axes:
    raise errors.UnsupportedFeatureError(
        f"a remote {what} addressing axes {sorted(map(str, other_axes))} "
        "that are not mesh axes (e.g. core axes)", ctx.kernel_name, _HINT)
  if target is None:
    return mesh.my_id()
  return jnp.asarray(target, jnp.int32)


def check_target(ctx, state, target, valid, what: str):
  """Records an error when a sent op targets a device outside the mesh."""
  if ctx.sites is None:
    return state
  size = ctx.mesh.size
  bad = valid & ((target < 0) | (target >= size))
  return checks.record(
      state, ctx.sites, ctx.grid_step, bad,
      f"remote {what}: device id {{0}} is outside the mesh of {size} devices",
      [target])


def valid_flag(ctx) -> jax.Array:
  """Whether this device issues the op (False in a branch it did not take)."""
  return jnp.asarray(True if ctx.active is None else ctx.active, jnp.bool_)


def exchange(mesh: DeviceMesh, valid, target, tree, carry, apply):
  """Applies what every device sent to this one, in sender order.

  Returns ``carry`` after ``carry = apply(hit, sent, carry)`` for each sender
  (a ``fori_loop`` over logical ids, so the program does not grow with the
  mesh): ``sent`` is ``tree`` as that sender computed it, ``hit`` a traced
  bool (the sender issued the op and targets this device). Leaves of
  ``tree`` that are not traced are the same on every device and are not
  sent.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  scalars, arrays = [], []
  for i, leaf in enumerate(leaves):
    if not isinstance(leaf, jax.core.Tracer):
      continue
    if (leaf.shape == () and jnp.issubdtype(leaf.dtype, jnp.integer)
        and jnp.dtype(leaf.dtype).itemsize <= 4):
      scalars.append(i)
    else:
      arrays.append(i)
  meta = jnp.stack([jnp.asarray(valid, jnp.int32),
                    jnp.asarray(target, jnp.int32)]
                   + [jnp.asarray(leaves[i], jnp.int32) for i in scalars])
  all_meta = mesh.gather(meta)
  all_arrays = [mesh.gather(leaves[i]) for i in arrays]
  me = mesh.my_id()

  def receive(s, carry):
    sent = list(leaves)
    row = all_meta[s]
    for k, i in enumerate(scalars):
      sent[i] = row[2 + k].astype(leaves[i].dtype)
    for i, values in zip(arrays, all_arrays, strict=True):
      sent[i] = values[s]
    hit = (row[0] != 0) & (row[1] == me)
    return apply(hit, treedef.unflatten(sent), carry)

  return lax.fori_loop(0, mesh.size, receive, carry)


def first_error(mesh: DeviceMesh, word):
  """(error word, device) of the first device that failed, and the reporter.

  Every device learns every device's error word (one all-gather after the
  grid); device 0 is the one that reports. Raising on each failing device
  would leave errors pending in JAX's runtime tokens.
  """
  words = mesh.gather(word)
  failed = words[:, 0] != 0
  first = jnp.argmax(failed).astype(jnp.int32)
  return words[first], first, mesh.my_id() == 0


def is_remote_eqn(eqn) -> bool:
  """Whether ``eqn`` is a DMA start or signal aimed at another device."""
  if eqn.primitive is _jax.dma_start_p:
    device_id = _jax.tree_unflatten(eqn.params["tree"], eqn.invars)[4]
  elif eqn.primitive is _jax.semaphore_signal_p:
    device_id = _jax.tree_unflatten(eqn.params["args_tree"], eqn.invars)[3]
  else:
    return False
  return device_id is not None


@functools.lru_cache(maxsize=4096)
def has_remote_ops(jaxpr: _jax.Jaxpr) -> bool:
  """Whether ``jaxpr`` (or a jaxpr nested in it) communicates with devices."""
  for eqn in jaxpr.eqns:
    if is_remote_eqn(eqn):
      return True
    for sub in _jax.jaxprs_in_params(eqn.params):
      if has_remote_ops(sub):
        return True
  return False


def nbytes(value) -> int:
  return math.prod(value.shape) * np.dtype(value.dtype).itemsize
