"""Rules for DMAs and semaphores, local and remote.

A DMA is a functional copy between two buffers. With
``dma_execution_mode="eager"`` it is done when it is started (a valid TPU
schedule); with ``"on_wait"`` it lands at the first wait on its semaphore
(see inflight.py), so a read of the destination before the wait sees the old
data. Either way its destination semaphore is incremented by the number of
bytes copied when it starts (a count the wait is then sure to find), and
``.wait()`` decrements it by the byte size of the copy it names. REGULAR
semaphores are integer counters changed by ``pl.semaphore_signal`` /
``semaphore_wait``.

A remote DMA (``make_async_remote_copy``) or signal (``device_id=...``) is a
``remote.Send``, delivered by an exchange between all devices of the mesh
together with the other remote ops issued before anything could observe
them (see remote.py): the payload lands in the receiver's destination,
whose receive semaphore gets the bytes; the sender's send semaphore gets
them when the op is issued. Waits are always local.

Fidelity lost: DMA latency and overlap with compute; in ``eager`` mode, reads
of a destination before its wait already see the new data.
"""

from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import errors
from fast_interpret import interpreter
from fast_interpret import outbox
from fast_interpret import remote
from fast_interpret import inflight
from fast_interpret import views
from fast_interpret.interpreter import RuleContext, register_rule
from fast_interpret.state import KernelState, RefHandle

BARRIER_ID = -3  # The kernel's barrier semaphore (a special buffer).


def _split_ref(ref) -> tuple[RefHandle | None, tuple]:
  """(handle, extra transforms) of a ref operand, possibly a TransformedRef."""
  if ref is None:
    return None, ()
  if isinstance(ref, RefHandle):
    return ref, ()
  inner, transforms = getattr(ref, "ref", None), getattr(ref, "transforms", ())
  if isinstance(inner, RefHandle):
    return inner, tuple(transforms)
  raise errors.InternalError(f"expected a ref operand, got {ref!r}.")


def _view(ref) -> tuple[RefHandle, tuple]:
  handle, extra = _split_ref(ref)
  return handle, handle.transforms + extra


def _nbytes(value, transforms=()) -> int:
  """Bytes a copy of ``value`` moves; ``transforms`` name its source view."""
  nbytes = math.prod(value.shape) * np.dtype(value.dtype).itemsize
  num, den = views.dynamic_size_fraction(transforms)
  return nbytes if den == 1 else nbytes * num // den


def _fit(value, shape):
  """Pads (zeros) or cuts ``value`` to ``shape``, dimension by dimension.

  Between views of dynamic size only the leading ``size`` rows of a
  dimension matter (views.py); the rest may differ in extent.
  """
  pads = [(0, max(0, t - v), 0) for v, t in zip(value.shape, shape,
                                                strict=True)]
  value = lax.pad(value, jnp.zeros((), value.dtype), pads)
  return lax.slice(value, [0] * len(shape), shape)


def _add_where(amount, hit):
  """A semaphore update: adds ``amount`` only where ``hit`` holds."""
  amount = jnp.asarray(amount, jnp.int32)
  if hit is not True:
    amount = jnp.where(hit, amount, jnp.int32(0))
  return lambda v: (None, _as_vector(
      lambda x: _keep_poison(x, x + amount))(v))


def _receive_count(ctx, sems, transforms, amount, hit):
  """``sems`` with ``amount`` added to the view ``transforms`` where ``hit``
  holds: a received DMA or signal.

  Elementwise over the whole (small) array, masked to the view, as
  ``_add_to_semaphore`` does with checks: a slice and an in-place update
  of the received index were three XLA kernels per receipt and did not
  fuse with the step's waits on the same array (the ring all-gather's
  checked step: 10 kernels, one past the 8 XLA:CPU runs without its
  dataflow executor). Without semaphore checks the counts feed fewer
  updates and the in-place update stays (it costs less there).
  """
  if not ctx.check_semaphores:
    return views.update(sems, transforms, _add_where(amount, hit))[1]
  mask = _view_mask(sems.shape, transforms)
  if hit is not True:
    mask = jnp.logical_and(mask, hit)
  return lax.select(mask, _keep_poison(sems, sems + jnp.int32(amount)),
                    sems)


# A wait that takes a semaphore count below zero *poisons* it (with
# check_semaphores on, outside predicated branches): the count becomes
# INT32_MIN | code, with the grid step, the kind of wait and the deficit in
# ``code``, and stays so; the kernel's end (or the end of a run_scoped)
# reports it (``end_records``). The check then costs a select in
# the semaphore's own update, not a record folded into the error word after
# every wait: on a double-buffered DMA kernel those folds were a third of the
# kernels of each grid step. Every count at or below _POISON_LIMIT is
# poisoned; a live count never gets there (2^30 bytes in flight at once).
_POISON_LIMIT = -(1 << 30)
_CODE_MASK = (1 << 30) - 1
_WAIT_KINDS = ("a DMA wait", "a semaphore wait")


def wait_code_bits(num_steps) -> int | None:
  """Bits of the deficit in a poisoned count, for a grid of ``num_steps``.

  The code is ``step << (bits + 1) | kind << bits | deficit`` in 30 bits;
  None (a dynamic or very long grid): waits record their checks instead.
  """
  if not isinstance(num_steps, (int, np.integer)):
    return None
  bits = 29 - max(1, (int(num_steps) - 1).bit_length())
  return bits if bits >= 8 else None


# Semaphore updates are built from ``lax`` calls, not ``jnp`` operators:
# they run for every DMA and wait, and each ``jnp`` operator on a tracer costs
# a jitted wrapper while tracing (the first call's lowering time).
def _keep_poison(v, new):
  return lax.select(lax.le(v, np.int32(_POISON_LIMIT)), v, new)


def _view_mask(shape, transforms) -> jax.Array:
  """bool array of ``shape``: True on the elements of the view ``transforms``.

  A one-element view compares flat indices with the one the view picks:
  elementwise code that XLA fuses into each update using it. The indices
  are an iota traced here, not a constant: a constant used inside a
  conditional's branch becomes an operand of the conditional, which XLA
  then materialises as a kernel of its own every grid step.
  """
  ids = lax.iota(jnp.int32, math.prod(shape)).reshape(shape)
  picked = views.read(ids, transforms)
  if picked.size == 1:
    return lax.eq(ids, lax.reshape(picked, ()))
  return views.update(jnp.zeros(shape, jnp.bool_), transforms,
                      lambda v: (None, jnp.ones(v.shape, jnp.bool_)))[1]


def _as_vector(update):
  """``update`` applied to a scalar view as a 1-element vector.

  A scalar view is a reshape of the buffer's dynamic slice; read more than
  once as a scalar (``_keep_poison`` compares, then selects) it keeps
  XLA:CPU from fusing the slice into the in-place update, which then costs
  two kernels instead of one.
  """
  def apply(v):
    return update(v.reshape(v.shape or (1,))).reshape(v.shape)
  return apply


def _poisoning_wait(v, amount, step, kind: int, bits: int):
  """``v + amount`` (amount <= 0), poisoned where it goes below zero."""
  new = lax.add(v, amount)
  cap = (1 << bits) - 1
  deficit = lax.select(lax.lt(new, np.int32(-cap)), lax.full_like(new, cap),
                       lax.neg(new))
  step = lax.shift_left(lax.convert_element_type(step, jnp.int32),
                        np.int32(bits + 1))
  code = lax.bitwise_or(lax.bitwise_or(step, np.int32(kind << bits)),
                        deficit)
  poison = lax.bitwise_or(code, np.int32(-(1 << 31)))
  return _keep_poison(v, lax.select(lax.lt(new, np.int32(0)), poison, new))


def end_records(ctx: RuleContext, state: KernelState, handles, gate=True,
                left_over: bool = True) -> list[checks.Record]:
  """Records for semaphores ``handles`` at the end of their lifetime.

  First a poisoned count (see ``_POISON_LIMIT``): it reports the wait that
  poisoned it, at the grid step it ran, so an error of an earlier step
  still wins over it and it wins over later ones. Then, with ``left_over``,
  a count left non-zero. All counts are checked as one vector, by one
  reduction: a kernel with many semaphores adds two records, not two each;
  the semaphore's site is read from a constant table.
  """
  ends = _end_counts(ctx, state, handles, left_over)
  if ends is None:
    return []
  counts, table, bits = ends
  return [checks.Record(site, step, (value,), failed & gate)
          for site, step, value, failed in _end_checks(
              counts, jnp.asarray(table), bits, ctx.grid_step, left_over)]


def end_host_check(ctx: RuleContext, state: KernelState, handles
                   ) -> checks.HostCheck | None:
  """``end_records`` (left-over counts too) decoded on the host instead.

  For the end of the kernel: only whether any count is non-zero is
  computed in the program; the callback that raises finds the semaphore
  and decodes its count. In the program, the decoding and its fold into
  the error word were three fusion kernels after the grid (a double-
  buffered DMA kernel's checked program: 401 optimised-HLO instructions,
  238 without them, and about 0.1 s of its 0.4 s compile).
  """
  ends = _end_counts(ctx, state, handles, True)
  if ends is None:
    return None
  counts, table, bits = ends
  values = jnp.concatenate([counts, lax.reshape(
      jnp.asarray(ctx.grid_step, jnp.int32), (1,))])
  return checks.HostCheck(
      values, jnp.any(lax.ne(counts, np.int32(0))),
      lambda v: _end_checks(v[:-1], table, bits, v[-1], True))


def _end_counts(ctx: RuleContext, state: KernelState, handles, left_over):
  """(counts, site table, wait code bits) of ``handles``, or None.

  ``counts`` is every count as one vector; row ``i`` of the table holds
  the sites of count ``i``'s semaphore: the four waits' (``_WAIT_KINDS``,
  exact or lower deficit), then left over.
  """
  handles = [h for h in handles if h.is_semaphore]
  if not handles or checks.ERROR_ID not in state.buffers:
    return None
  bits = ctx.wait_code_bits if ctx.check_semaphores else None
  if bits is None and not left_over:
    return None
  hint = _LOCKSTEP_HINT if ctx.lockstep is not None else ""
  counts, table = [], []
  for h in handles:
    value = state.read(h.buffer_id)
    if h.per_core:
      value = value[ctx.core_index]
    value = views.read(value, h.transforms)  # Its part of a shared buffer.
    counts.append(value.ravel())
    sites = [ctx.sites.add(
        f"semaphore: {what} on {h.name} waits for more than was signalled "
        f"(count would be {{0}}{lower}); on a TPU this wait never returns"
        + hint) for what in _WAIT_KINDS for lower in ("", " or lower")
             ] if bits is not None else [0] * 4
    sites.append(ctx.sites.add(
        f"semaphore: {h.name} is left at {{0}} when the kernel ends; every "
        "signal (and DMA) must be matched by a wait") if left_over else 0)
    table += [sites] * value.size
  return jnp.concatenate(counts), np.asarray(table, np.int32), bits


def _end_checks(counts, table, bits: int | None, step, left_over: bool
                ) -> list[tuple]:
  """``(site, step, value, failed)`` of the end checks on ``counts``.

  The same code runs traced (records) and on the host (NumPy arrays).
  """
  nonzero = counts != 0
  if bits is None:
    first = nonzero.argmax()
    return [(table[first, 4], step, counts[first], nonzero[first])]
  poisoned = counts <= _POISON_LIMIT
  # The first poisoned count if any, else the first non-zero one.
  first = (poisoned.astype(np.int32) * 2 + nonzero).argmax()
  count = counts[first]
  code = count & np.int32(_CODE_MASK)
  cap = (1 << bits) - 1
  deficit = code & np.int32(cap)
  column = ((code >> bits) & 1) * 2 + (deficit == cap).astype(np.int32)
  ends = [(table[first, column], code >> (bits + 1), -deficit,
           poisoned[first])]
  if left_over:
    ends.append((table[first, 4], step, count, nonzero[first]))
  return ends


def _sem_view(ctx: RuleContext, state: KernelState, sem, core=None
              ) -> tuple[RefHandle, tuple]:
  """(handle, transforms) of a semaphore, on ``core``'s row if per core.

  ``core`` defaults to the running core; a signal with ``core_index`` names
  another one.
  """
  handle, transforms = _view(sem)
  if not handle.per_core:
    return handle, transforms
  row = ctx.core_index if core is None else core
  shape = state.read(handle.buffer_id).shape
  if not isinstance(row, jax.core.Tracer):
    row = int(row)  # A static row keeps the update a static slice.
  indexer = _jax.NDIndexer.from_indices_shape(
      (row,) + (slice(None),) * (len(shape) - 1),
      shape)
  return handle, (indexer, *transforms)


def _add_to_semaphore(ctx: RuleContext, state: KernelState, sem, amount,
                      what: str = "", core=None) -> KernelState:
  """Adds ``amount`` to a semaphore; with checks, a negative count is an error.

  A count below zero means a wait asked for more than was (or ever will be,
  in this eager model) signalled: on a TPU that wait would hang. The wait
  poisons the count (see ``_POISON_LIMIT``), or records a check where no
  code fits (``wait_code_bits``). Inside a predicated conditional (remote
  ops in a branch) the check is deferred to the end of the grid step (see
  ``check_pending_waits``).
  """
  handle, transforms = _sem_view(ctx, state, sem, core)
  amount = jnp.asarray(amount, jnp.int32)
  bits = ctx.wait_code_bits if ctx.check_semaphores else None
  if bits is not None and what and not ctx.defer_waits:
    kind = _WAIT_KINDS.index(what)
    update = lambda v: _poisoning_wait(v, amount, ctx.grid_step, kind, bits)
  elif bits is not None:
    update = lambda v: _keep_poison(v, lax.add(v, amount))
  else:
    update = lambda v: lax.add(v, amount)
  buf = state.read(handle.buffer_id)
  if bits is not None:
    # Elementwise over the whole (small) array, masked to the view: the
    # updates of one straight run fuse into one kernel, not one each.
    mask = _view_mask(buf.shape, transforms)
    state = state.write(handle.buffer_id, lax.select(mask, update(buf), buf))
  else:
    new, buf = views.update(buf, transforms, lambda v: (update(v),) * 2)
    state = state.write(handle.buffer_id, buf)
  if ctx.check_semaphores and what and ctx.defer_waits:
    ctx.pending_waits.append((handle.buffer_id, handle.name, what))
  elif ctx.check_semaphores and what and bits is None:
    low = jnp.min(new)
    state = checks.record_outside(
        state, ctx.sites, ctx.grid_step, [(low, 0, _INT32_MAX)],
        f"semaphore: {what} on {handle.name} waits for more than was "
        "signalled (count would be {0}); on a TPU this wait never returns"
        + (_LOCKSTEP_HINT if ctx.lockstep is not None else ""), [low])
  return state


def check_pending_waits(ctx: RuleContext, state: KernelState, buffer_ids=None
                        ) -> KernelState:
  """Checks deferred waits (of ``buffer_ids``, or all) and forgets them.

  A semaphore that such a wait took below zero, and that no device's branch
  has refilled by now, is waited on for more than is ever signalled.
  """
  pending = ctx.pending_waits or []
  done = [w for w in pending if buffer_ids is None or w[0] in buffer_ids]
  pending[:] = [w for w in pending if w not in done]
  seen = set()
  for bid, name, what in done:
    if bid in seen:
      continue
    seen.add(bid)
    low = jnp.min(state.read(bid))
    state = checks.record_outside(
        state, ctx.sites, ctx.grid_step, [(low, 0, _INT32_MAX)],
        f"semaphore: {what} on {name} (in a branch with remote ops) waits for "
        "more than was signalled by the end of the grid step (count {0}); "
        "on a TPU this wait never returns", [low])
  return state


_INT32_MAX = 2**31 - 1

_LOCKSTEP_HINT = (
    ", unless another core signals it later: simulated cores switch only at "
    "waits, in core order (see docs/limitations.md, 'Multiple cores')")



@register_rule(_jax.dma_start_p, predicated=True)
def _dma_start_rule(ctx: RuleContext, state: KernelState, *flat, tree,
                    device_id_type, priority=0, add=False):
  """``copy.start()``: copies now and signals the destination semaphore.

  A remote copy is delivered to the target device at the same program point;
  its send semaphore is signalled on this device.
  """
  del priority
  src, dst, dst_sem, src_sem, device_id = _jax.tree_unflatten(tree, flat)
  before = state
  src_h, src_t = _view(src)
  dst_h, dst_t = _view(dst)
  src_report, dst_report = checks.bounds_report(ctx), checks.bounds_report(ctx)
  value = views.read(state.read(src_h.buffer_id), src_t, src_report,
                     fill=ctx.oob_fill, ranges=ctx.ranges)
  state = checks.record_bounds(ctx, state, src_report, src_h.name,
                               "DMA source")

  nbytes = _nbytes(value, src_t)
  dynamic = views.has_dynamic_size(src_t) or views.has_dynamic_size(dst_t)

  def put(view, value=value, hit=True):
    if dynamic and view.ndim == value.ndim:
      value = _fit(value, view.shape)
    if view.shape != value.shape:
      raise errors.UnsupportedFeatureError(
          f"a DMA from {src_h.name} {value.shape} into {dst_h.name} "
          f"{view.shape} of a different shape", ctx.kernel_name,
          "Source and destination views of a DMA must have the same shape.")
    new = view + value.astype(view.dtype) if add else value.astype(view.dtype)
    return None, new if hit is True else jnp.where(hit, new, view)

  if device_id is None:
    if inflight.can_defer(ctx.in_flight, dst_h, dst_t, add):
      sem_h, sem_t = _view(dst_sem)
      state = inflight.start(state, ctx.in_flight[dst_h.buffer_id], dst_t,
                             put, inflight.semaphore_tag(state, sem_h, sem_t),
                             dst_report, fill=ctx.oob_fill)
    else:
      _, buf = views.update(state.read(dst_h.buffer_id), dst_t, put,
                            dst_report, fill=ctx.oob_fill, ranges=ctx.ranges)
      state = state.write(dst_h.buffer_id, buf)
    state = checks.record_bounds(ctx, state, dst_report, dst_h.name,
                                 "DMA destination")
    state = _add_to_semaphore(ctx, state, dst_sem, nbytes)
    return interpreter.mask_inactive(ctx, before, state), []

  # A remote copy's destination indices are checked on the sender, against
  # its own copy of the buffer (every device has the same shapes). Remote
  # copies land at the start in every dma_execution_mode.
  views.update(state.read(dst_h.buffer_id), dst_t, put, dst_report)
  state = checks.record_bounds(ctx, state, dst_report, dst_h.name,
                               "DMA destination")
  target = remote.logical_id(ctx, device_id, device_id_type, "DMA")
  valid = remote.valid_flag(ctx)
  state = remote.check_target(ctx, state, target, valid, "DMA")
  state = _add_to_semaphore(ctx, state, src_sem, nbytes)
  state = interpreter.mask_inactive(ctx, before, state)
  sem_h, sem_t = _view(dst_sem)

  dst_id, sem_id = dst_h.buffer_id, sem_h.buffer_id

  def receive(hit, sent, buffers):
    payload, view_t, sem_view_t = sent
    _, buf = views.update(buffers[dst_id], view_t,
                          lambda v: put(v, payload, hit))
    buffers = {**buffers, dst_id: buf}
    return {**buffers, sem_id: _receive_count(
        ctx, buffers[sem_id], sem_view_t, nbytes, hit)}

  return outbox.post(ctx, state, remote.make_send(
      ctx.mesh, valid, target, (value, dst_t, sem_t), (dst_id, sem_id),
      receive, boxes=[(dst_id, outbox.view_box(dst_t))])), []


@register_rule(_jax.dma_wait_p)
def _dma_wait_rule(ctx: RuleContext, state: KernelState, *flat, tree,
                   device_id_type, **_):
  """``copy.wait()``: lands copies in flight; takes the bytes off the semaphore.

  The byte count comes from the view of the source the wait names. Waits are
  local for remote copies too: ``wait_recv`` on the receive semaphore,
  ``wait_send`` (src and dst swapped) on the send semaphore.
  """
  del device_id_type
  src, _, dst_sem, _, _ = _jax.tree_unflatten(tree, flat)
  if ctx.in_flight:
    sem_h, sem_t = _view(dst_sem)
    state = inflight.land(ctx.in_flight, state,
                          inflight.semaphore_tag(state, sem_h, sem_t))
  src_h, src_t = _view(src)
  shape = views.read(state.read(src_h.buffer_id), src_t)
  return _add_to_semaphore(ctx, state, dst_sem, -_nbytes(shape, src_t),
                           "a DMA wait"), []


@register_rule(_jax.semaphore_signal_p, predicated=True)
def _semaphore_signal_rule(ctx: RuleContext, state: KernelState, *flat,
                           args_tree, device_id_type=None, **_):
  """``pl.semaphore_signal``: adds ``inc`` to a semaphore of this core,
  another core (``core_index``) or another device (``device_id``).

  ``core_index`` names a core of the same chip; the signal lands at once
  (no latency is modelled). Cores only signal each other when they run in
  lock step (cores.py), where semaphores have one row per core; with one
  core, ``core_index`` can only be this core. A remote signal is an exchange
  between the devices of the mesh (remote.py).
  """
  sem, sem_transforms, inc, device_id, core_index = _jax.tree_unflatten(
      args_tree, flat)
  handle = sem.with_transforms(sem_transforms)
  if core_index is not None and not handle.per_core and (
      ctx.lockstep is not None):
    raise errors.UnsupportedFeatureError(
        f"semaphore_signal with core_index on {handle.name}, which was "
        "allocated inside a loop or conditional that the cores do not run in "
        "lock step", ctx.kernel_name,
        "Allocate the semaphore in scratch_shapes, or with pl.run_scoped at "
        "the top level of the kernel.")
  before = state
  if device_id is None:
    state = _add_to_semaphore(ctx, state, handle, inc, core=core_index)
    return interpreter.mask_inactive(ctx, before, state), []
  if core_index is not None:
    raise errors.UnsupportedFeatureError(
        "semaphore_signal with both device_id and core_index",
        ctx.kernel_name, "Signal another core of this device, or the same "
        "core of another device.")
  target = remote.logical_id(ctx, device_id, device_id_type,
                             "semaphore signal")
  valid = remote.valid_flag(ctx)
  state = remote.check_target(ctx, state, target, valid, "semaphore signal")
  state = interpreter.mask_inactive(ctx, before, state)
  sem_h, sem_t = _view(handle)

  sem_id = sem_h.buffer_id

  def receive(hit, sent, buffers):
    amount, view_t = sent
    return {**buffers, sem_id: _receive_count(ctx, buffers[sem_id], view_t,
                                              amount, hit)}

  return outbox.post(ctx, state, remote.make_send(
      ctx.mesh, valid, target, (_static_or_int32(inc), sem_t),
      (sem_id,), receive)), []


def _static_or_int32(x):
  """``x`` as int32: NumPy when known while tracing (then it is the same on
  every device, and a remote op need not send it), else traced."""
  if isinstance(x, jax.core.Tracer):
    return jnp.asarray(x, jnp.int32)
  return np.asarray(x, np.int32)


@register_rule(_jax.get_barrier_semaphore_p)
def _get_barrier_semaphore_rule(ctx: RuleContext, state: KernelState):
  """``pltpu.get_barrier_semaphore()``: the kernel's barrier semaphore.

  One counter per kernel call, zero at entry, that remote signals can reach
  on other devices. Fidelity lost: TPUs share a barrier semaphore between
  kernels with the same ``collective_id``; each call here has its own.
  """
  del ctx
  return state, RefHandle(BARRIER_ID, "semaphore", "barrier_semaphore")
@register_rule(_jax.semaphore_wait_p)
def _semaphore_wait_rule(ctx: RuleContext, state: KernelState, *flat,
                         args_tree, **_):
  """``pl.semaphore_wait``: subtracts ``value`` (when decrementing)."""
  sem, sem_transforms, value, decrement = _jax.tree_unflatten(args_tree, flat)
  if not decrement:
    return state, []
  handle = sem.with_transforms(sem_transforms)
  return _add_to_semaphore(ctx, state, handle, -jnp.asarray(value, jnp.int32),
                           "a semaphore wait"), []


@register_rule(_jax.semaphore_read_p)
def _semaphore_read_rule(ctx: RuleContext, state: KernelState, *flat,
                         args_tree):
  """``pl.semaphore_read``: the counter's current value."""
  sem, sem_transforms = _jax.tree_unflatten(args_tree, flat)
  handle, transforms = _sem_view(ctx, state, sem.with_transforms(sem_transforms))
  return state, views.read(state.read(handle.buffer_id), transforms)
