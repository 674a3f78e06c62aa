"""Remote DMAs and signals between the devices of a ``jax.shard_map``.

A kernel called inside ``jax.shard_map`` is lowered once, in the per-device
body of the SPMD program: every device runs the same compiled simulation.
We model the devices as running that program in lockstep, so a remote copy
or signal is executed by all of them at the same program point, and is
delivered by a collective over the mesh axes:

  1. A remote op becomes a ``Send``: a valid flag (False on a device whose
     branch does not issue the op, see ``RuleContext.active``; not sent
     outside such branches), the logical id of the target device, the
     payload, the dynamic indices of the destination view and semaphore
     (the sender computes them, as on TPU), and the receipt to apply.
     Values known while tracing (a signal's ``inc`` of 1, static indices)
     are the same on every device and are not sent.
  2. It waits in the outbox of the jaxpr being evaluated until something
     could observe what it delivers (outbox.py), then goes in one exchange
     with the others waiting.
  3. ``deliver``: if every waiting send's target is a function of the device
     alone (``static_targets`` looks back through the trace to
     ``lax.axis_index`` and evaluates it with NumPy for every device) and no
     two devices target the same one (``static_permutation``), and all share
     one permutation, one ``ppermute`` moves their values, packed into one
     vector of 32-bit words; with nothing traced to send (a static signal
     along a static permutation) there is no collective at all. Sends going
     several ways, or to targets known only at run time, are one
     ``all_gather`` of every device's vector.
  4. The receiver applies what reached it, in issue order (after an
     all-gather: for a static permutation its one sender; otherwise in
     sender order, the entries whose target is its own id and whose valid
     flag is set): it writes the payload into its destination view and adds
     to its semaphore (bytes for a DMA, ``inc`` for a signal).

``same_on_every_device`` tells control flow (control_rules) when a branch
condition depends on the grid step alone, so that branches with remote ops
in them need no predication.

Fidelity: a remote write lands on the receiver before anything there could
read it, at the latest at the end of the jaxpr (loop body, branch, kernel)
that issued it: an eager, valid schedule of a correctly synchronised
kernel; run-ahead, races and delivery order between simultaneous senders
are not modelled. Deferring changes no result: a send is delivered before
any read of its destination buffer or semaphore, and receipts keep their
issue order. Cost: on a CPU the number of collectives, not their size, is
what a multi-device kernel's time is made of, so a flush is one collective
(a ppermute moves the payload once; the all-gather moves mesh-size times
it, cheap for the few devices a CPU simulates; beyond ``_GATHER_MAX_WORDS``
sends going several ways take one ppermute per way).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
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
  targets = static_targets(ctx.mesh, target)
  if targets is not None and np.all((targets >= 0) & (targets < size)):
    return state  # In the mesh on every device: the check cannot fail.
  bad = valid & ((target < 0) | (target >= size))
  return checks.record(
      state, ctx.sites, ctx.grid_step, bad,
      f"remote {what}: device id {{0}} is outside the mesh of {size} devices",
      [target])


def valid_flag(ctx):
  """Whether this device issues the op: a traced bool in a predicated branch
  (False where this device did not take it), else the Python ``True`` (no
  masking code is emitted then)."""
  if ctx.active is None:
    return True
  return jnp.asarray(ctx.active, jnp.bool_)


# --- Static targets ---------------------------------------------------------

_MAX_OPS = 64  # Equations we look back through for a target; more: dynamic.


class _Dynamic(Exception):
  """The target is not a function of the device alone (or too costly to see)."""


def _trunc_div(a, b):
  if np.issubdtype(a.dtype, np.integer):
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q)
  return a / b


def _nonzero_divisor(op):
  def rule(a, b):
    if np.any(b == 0):
      raise _Dynamic  # XLA's result, not NumPy's, would be the right one.
    return op(a, b)
  return rule


_ELEMENTWISE = {
    lax.add_p: np.add, lax.sub_p: np.subtract, lax.mul_p: np.multiply,
    lax.neg_p: np.negative, lax.max_p: np.maximum, lax.min_p: np.minimum,
    lax.abs_p: np.abs, lax.sign_p: np.sign,
    lax.rem_p: _nonzero_divisor(np.fmod),  # C remainder, as lax.rem.
    lax.div_p: _nonzero_divisor(_trunc_div),
    lax.eq_p: np.equal, lax.ne_p: np.not_equal, lax.lt_p: np.less,
    lax.le_p: np.less_equal, lax.gt_p: np.greater, lax.ge_p: np.greater_equal,
    lax.and_p: np.bitwise_and, lax.or_p: np.bitwise_or,
    lax.xor_p: np.bitwise_xor, lax.not_p: np.invert,
    lax.clamp_p: lambda lo, x, hi: np.minimum(np.maximum(x, lo), hi),
    lax.select_n_p: lambda which, *cases: np.choose(which.astype(np.int32),
                                                    cases),
}


def _np_eqn(prim, params, args, out_avals):
  """Outputs of one equation on per-device values (leading device axis)."""
  if not args:
    raise _Dynamic
  size = args[0].shape[0]
  if prim in _ELEMENTWISE:
    out = _ELEMENTWISE[prim](*args)
  elif prim is lax.convert_element_type_p:
    out = args[0]
  elif prim is lax.integer_pow_p:
    out = args[0] ** params["y"]
  elif prim in (lax.reshape_p, lax.squeeze_p, lax.broadcast_in_dim_p) and (
      args[0].size == size):  # One element per device: only its shape moves.
    out = args[0]
  elif prim is _jax.jit_p:
    return _np_jaxpr(params["jaxpr"], args)
  else:
    raise _Dynamic
  (aval,) = out_avals
  out = np.asarray(out)
  if out.size == size:
    out = out.reshape((size,) + (1,) * len(aval.shape))
  return [np.broadcast_to(out, (size, *aval.shape)).astype(aval.dtype)]


def _np_jaxpr(closed, args):
  env = {}

  def read(atom, size):
    if isinstance(atom, _jax.Literal):
      return _per_device(atom.val, atom.aval, size)
    return env[atom]

  size = args[0].shape[0]
  for var, c in zip(closed.jaxpr.constvars, closed.consts, strict=True):
    env[var] = _per_device(c, var.aval, size)
  env.update(zip(closed.jaxpr.invars, args, strict=True))
  for eqn in closed.jaxpr.eqns:
    outs = _np_eqn(eqn.primitive, eqn.params,
                   [read(v, size) for v in eqn.invars],
                   [v.aval for v in eqn.outvars])
    env.update(zip(eqn.outvars, outs, strict=True))
  return [read(v, size) for v in closed.jaxpr.outvars]


def _per_device(value, aval, size):
  value = np.asarray(value, aval.dtype)
  return np.broadcast_to(value, (size, *value.shape))


def static_targets(mesh: DeviceMesh, target) -> np.ndarray | None:
  """The value of ``target`` on every device, if it depends on nothing else.

  Looks back (at most ``_MAX_OPS`` equations) at how the traced ``target``
  was computed: from ``lax.axis_index`` of mesh axes, literals, constants
  and integer arithmetic, e.g. ``(axis_index("x") + 1) % n``. Evaluates
  that with NumPy for every device. Returns None when anything else feeds
  it (a loop carry, a value read from memory, an unknown primitive).
  """
  if not isinstance(target, jax.core.Tracer) or not mesh.axis_names:
    return None
  strides = {name: math.prod(mesh.axis_sizes[i + 1:])
             for i, name in enumerate(mesh.axis_names)}
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  devices = np.arange(mesh.size, dtype=np.int32)
  memo: dict[int, np.ndarray] = {}
  seen = []  # Keeps the tracers in ``memo`` alive, so ids are not reused.

  def value(x):
    if id(x) in memo:
      return memo[id(x)]
    origin = _jax.traced_origin(x)
    if origin is None:
      raise _Dynamic
    if origin[0] == "value":
      out = _per_device(origin[1], jax.typeof(x), mesh.size)
    else:
      _, prim, params, operands, k = origin
      if len(seen) >= _MAX_OPS:
        raise _Dynamic
      if prim is lax.axis_index_p:
        name = params["axis_name"]
        if name not in strides:
          raise _Dynamic
        out = (devices // strides[name]) % sizes[name]
      else:
        out = _np_eqn(prim, params, [value(o) for o in operands],
                      [jax.typeof(x)] if prim is not _jax.jit_p else
                      [v.aval for v in params["jaxpr"].jaxpr.outvars])[k]
      out = np.asarray(out, jax.typeof(x).dtype)
    seen.append(x)
    memo[id(x)] = out
    return out

  try:
    with np.errstate(all="ignore"):
      return value(target).astype(np.int64)
  except _Dynamic:
    return None


_SAME_EVERYWHERE = frozenset(_ELEMENTWISE) | {
    lax.convert_element_type_p, lax.integer_pow_p, lax.reshape_p,
    lax.squeeze_p, lax.broadcast_in_dim_p}


def same_on_every_device(ctx, x) -> bool:
  """Whether ``x`` is sure to be the same on every device.

  True when, looking back at most ``_MAX_OPS`` equations, it is computed
  from program ids, grid sizes and constants alone by arithmetic (the grid
  is the same on every device); False when anything else may feed it (a
  value read from memory, ``lax.axis_index``, a loop carry).
  """
  known = {id(v) for v in (*ctx.program_ids, *ctx.num_programs)}
  memo: dict[int, bool] = {}
  seen = []  # Keeps the tracers in ``memo`` alive, so ids are not reused.

  def same(v) -> bool:
    if not isinstance(v, jax.core.Tracer) or id(v) in known:
      return True
    if id(v) not in memo:
      origin = _jax.traced_origin(v)
      if origin is None or len(seen) >= _MAX_OPS:
        memo[id(v)] = False
      elif origin[0] == "value":
        memo[id(v)] = True
      else:
        _, prim, params, operands, _ = origin
        if prim is _jax.jit_p:
          pure = all(e.primitive in _SAME_EVERYWHERE
                     for e in params["jaxpr"].jaxpr.eqns)
        else:
          pure = prim in _SAME_EVERYWHERE
        seen.append(v)
        memo[id(v)] = pure and all(same(o) for o in operands)
    return memo[id(v)]

  return same(x)


def static_permutation(targets: np.ndarray | None, size: int
                       ) -> tuple[tuple[int, int], ...] | None:
  """``(sender, receiver)`` pairs, if no two devices target the same one.

  Targets outside the mesh are left out (such a send is an error, recorded
  by ``check_target``, and lands nowhere). None when ``targets`` is None,
  names no device in the mesh, or two devices target one.
  """
  if targets is None:
    return None
  pairs = tuple((s, int(t)) for s, t in enumerate(targets) if 0 <= t < size)
  receivers = {t for _, t in pairs}
  if not pairs or len(receivers) != len(pairs):
    return None
  return pairs


# --- Packing into 32-bit words ----------------------------------------------


def _word_count(leaf) -> int | None:
  """Words ``leaf`` takes in a packed vector, or None if it is sent alone."""
  dtype = np.dtype(leaf.dtype)
  size = math.prod(leaf.shape)
  if dtype == np.bool_:
    return size
  if not (jnp.issubdtype(dtype, jnp.integer)
          or jnp.issubdtype(dtype, jnp.floating)):
    return None
  if dtype.itemsize >= 4:
    return size * dtype.itemsize // 4
  per_word = 4 // dtype.itemsize
  return size // per_word if size % per_word == 0 else size


def _to_words(leaf) -> jax.Array:
  dtype = np.dtype(leaf.dtype)
  size = math.prod(leaf.shape)
  if dtype == np.bool_:
    return leaf.astype(jnp.int32).reshape(-1)
  if dtype.itemsize < 4:
    per_word = 4 // dtype.itemsize
    if size % per_word:  # Widened, one element a word.
      wide = jnp.int32 if jnp.issubdtype(dtype, jnp.integer) else jnp.float32
      return lax.bitcast_convert_type(leaf.astype(wide), jnp.int32).reshape(-1)
    leaf = leaf.reshape(-1, per_word)
  return lax.bitcast_convert_type(leaf, jnp.int32).reshape(-1)


def _from_words(words, like) -> jax.Array:
  dtype = np.dtype(like.dtype)
  shape = like.shape
  size = math.prod(shape)
  if dtype == np.bool_:
    return (words != 0).reshape(shape)
  if dtype.itemsize < 4:
    per_word = 4 // dtype.itemsize
    if size % per_word:
      wide = jnp.int32 if jnp.issubdtype(dtype, jnp.integer) else jnp.float32
      return lax.bitcast_convert_type(words, wide).astype(dtype).reshape(shape)
    return lax.bitcast_convert_type(words, dtype).reshape(shape)
  if dtype.itemsize == 8:
    words = words.reshape(*shape, 2)
  else:
    words = words.reshape(shape)
  return lax.bitcast_convert_type(words, dtype)


@dataclasses.dataclass(frozen=True)
class _Packing:
  """How values travel: one int32 word vector, plus the few sent alone.

  Attributes:
    spans: ``(value index, start, stop)`` of each packed value.
    alone: indices of the values that cannot be packed (e.g. complex).
  """

  spans: tuple[tuple[int, int, int], ...]
  alone: tuple[int, ...]

  @classmethod
  def of(cls, values) -> _Packing:
    spans, alone, at = [], [], 0
    for i, v in enumerate(values):
      n = _word_count(v)
      if n is None:
        alone.append(i)
      else:
        spans.append((i, at, at + n))
        at += n
    return cls(tuple(spans), tuple(alone))

  def pack(self, values) -> tuple[jax.Array | None, list[jax.Array]]:
    words = [_to_words(jnp.asarray(values[i])) for i, _, _ in self.spans]
    packed = jnp.concatenate(words) if words else None
    return packed, [values[i] for i in self.alone]

  def unpack(self, packed, alone, like) -> list[jax.Array]:
    out = list(like)
    for i, start, stop in self.spans:
      out[i] = _from_words(packed[start:stop], like[i])
    for i, v in zip(self.alone, alone, strict=True):
      out[i] = v
    return out


# --- The exchange -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Send:
  """A remote op issued on every device, waiting to be delivered.

  Attributes:
    valid: whether this device issued it: a traced bool, or the Python
      ``True`` (not sent then).
    target: the logical id of the receiver, an int32 scalar.
    perm: ``(sender, receiver)`` pairs when every device's target is known
      while tracing and no two coincide (``static_permutation``), else None.
    tree: what the receiver needs, as the sender computed it. Leaves that
      are not traced are the same on every device and are not sent.
    buffer_ids: the buffers ``apply`` changes on the receiver.
    apply: ``apply(hit, tree, buffers) -> buffers``: the receipt, on a dict
      from buffer id to value; ``hit`` says whether a sender's op reached
      this device (the Python ``True`` when that is sure).
    same_valid: ``valid`` is the same on every device (a send that left a
      branch every device took alike, see ``sends_of``): not sent, the
      receiver uses its own.
    boxes: ``(buffer id, box)``: the part of a buffer it writes, where
      known while tracing (``view_box``); other buffers count as whole.
  """

  valid: Any
  target: Any
  perm: tuple[tuple[int, int], ...] | None
  tree: Any
  buffer_ids: frozenset[int]
  apply: Callable[..., dict]
  same_valid: bool = False
  boxes: tuple[tuple[int, Any], ...] = ()


def make_send(mesh: DeviceMesh, valid, target, tree, buffer_ids, apply,
              boxes=()) -> Send:
  """A ``Send``, its permutation found from ``target`` (``static_targets``)."""
  perm = static_permutation(static_targets(mesh, target), mesh.size)
  return Send(valid, target, perm, tree, frozenset(buffer_ids), apply,
              boxes=tuple(boxes))


@dataclasses.dataclass(frozen=True)
class _Wire:
  """How one ``Send`` travels: its values, in a combined packing at ``at``."""

  send: Send
  values: tuple[Any, ...]  # [valid] + [target] + the traced leaves.
  head: int                # How many of ``values`` are valid and target.
  sent: tuple[int, ...]    # Indices of the traced leaves of ``send.tree``.

  @classmethod
  def of(cls, send: Send, with_target: bool) -> _Wire:
    leaves = jax.tree_util.tree_leaves(send.tree)
    sent = tuple(i for i, leaf in enumerate(leaves)
                 if isinstance(leaf, jax.core.Tracer))
    head = ([] if send.valid is True or send.same_valid
            else [jnp.asarray(send.valid, jnp.bool_)])
    if with_target and isinstance(send.target, jax.core.Tracer):
      head.append(jnp.asarray(send.target, jnp.int32))
    return cls(send, tuple(head) + tuple(leaves[i] for i in sent), len(head),
               sent)

  def received(self, got) -> tuple[Any, Any, Any]:
    """(valid, target, tree) of what a sender sent, from its ``values``."""
    leaves, treedef = jax.tree_util.tree_flatten(self.send.tree)
    for i, v in zip(self.sent, got[self.head:], strict=True):
      leaves[i] = v
    rest = list(got[:self.head])
    if self.send.valid is True or self.send.same_valid:
      valid = self.send.valid
    else:
      valid = rest.pop(0)
    target = rest.pop(0) if rest else self.send.target
    return valid, target, treedef.unflatten(leaves)


def _pack(wires):
  """One packing of the values of ``wires``; returns it and each's span."""
  values, spans = [], []
  for w in wires:
    spans.append((len(values), len(values) + len(w.values)))
    values += w.values
  packing = _Packing.of(values)
  packed, alone = packing.pack(values)
  return packing, values, spans, packed, alone


# A flush whose sends go more than one way is one all-gather while it moves
# at most this many words per device; beyond, one ppermute per permutation
# (an all-gather moves mesh-size times the data; on a CPU the count of
# collectives costs more than their size until the payloads are large).
_GATHER_MAX_WORDS = 1 << 18


def deliver(mesh: DeviceMesh, sends, buffers: dict) -> dict:
  """Delivers ``sends`` (in issue order) to every device, in few collectives.

  Returns ``buffers`` after each send's ``apply`` for what reached this
  device. When every send has a static permutation and they all share one,
  their values travel packed in one vector of 32-bit words, by one
  ``ppermute``. When they go several ways, or a target is only known at run
  time, every device gathers every device's vector once (``all_gather``)
  and picks what was aimed at it: for a static permutation, the one sender
  (a table lookup); otherwise each sender in logical-id order (a
  ``fori_loop`` over the mesh, so the program does not grow with it). Large
  payloads going several static ways move by one ppermute per permutation
  instead. Either way receipts are applied in issue order, each op's
  senders in logical-id order: the order of delivering them one by one.
  """
  sends = list(sends)
  if not sends:
    return buffers
  me = mesh.my_id()
  perms = list(dict.fromkeys(s.perm for s in sends))
  wires = [_Wire.of(s, with_target=s.perm is None) for s in sends]
  words = sum(_word_count(jnp.asarray(v)) or 0 for w in wires
              for v in w.values)
  if None not in perms and (len(perms) == 1
                            or words * mesh.size > _GATHER_MAX_WORDS):
    got = {}
    for perm in perms:
      group = [i for i, s in enumerate(sends) if s.perm == perm]
      got.update(zip(group, _permute(mesh, perm, [wires[i] for i in group]),
                     strict=True))
    for i, s in enumerate(sends):
      buffers = s.apply(*got[i], buffers)
    return buffers

  packing, values, spans, packed, alone = _pack(wires)
  all_packed = None if packed is None else mesh.gather(packed)
  all_alone = [mesh.gather(v) for v in alone]

  def row(sender):
    return packing.unpack(None if all_packed is None else all_packed[sender],
                          [v[sender] for v in all_alone], values)

  for w, (lo, hi) in zip(wires, spans, strict=True):
    s = w.send
    if s.perm is not None:
      source = np.full(mesh.size, -1, np.int32)
      for sender, receiver in s.perm:
        source[receiver] = sender
      sender = jnp.asarray(source)[me]
      valid, _, tree = w.received(row(jnp.maximum(sender, 0))[lo:hi])
      hit = valid if (source >= 0).all() else (sender >= 0) & valid
      buffers = s.apply(hit, tree, buffers)
      continue

    def receive(sender, buffers, w=w, lo=lo, hi=hi):
      valid, to, tree = w.received(row(sender)[lo:hi])
      hit = jnp.asarray(to, jnp.int32) == me
      if valid is not True:
        hit = hit & valid
      return w.send.apply(hit, tree, buffers)

    buffers = lax.fori_loop(0, mesh.size, receive, buffers)
  return buffers


def _permute(mesh: DeviceMesh, perm, wires):
  """(hit, tree) of each of ``wires``, moved by one ppermute along ``perm``."""
  packing, values, spans, packed, alone = _pack(wires)
  names = tuple(mesh.axis_names)
  move = lambda x: lax.ppermute(x, names, perm)
  got = packing.unpack(None if packed is None else move(packed),
                       [move(v) for v in alone], values)
  if len(perm) == mesh.size:
    receives = True
  else:
    table = np.zeros(mesh.size, np.bool_)
    table[[t for _, t in perm]] = True
    receives = jnp.asarray(table)[mesh.my_id()]
  out = []
  for w, (lo, hi) in zip(wires, spans, strict=True):
    valid, _, tree = w.received(got[lo:hi])
    if valid is True:
      hit = receives
    else:
      hit = valid if receives is True else valid & receives
    out.append((hit, tree))
  return out


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
