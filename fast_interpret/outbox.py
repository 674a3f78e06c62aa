"""Deferring remote ops: the outbox of a jaxpr, and what observes a send.

In a multi-device kernel a remote DMA or signal (a ``remote.Send``) is not
delivered when issued:

  1. ``post`` puts it in the outbox of the jaxpr being evaluated
     (``RuleContext.outbox``, one per ``interpreter.eval_jaxpr``).
  2. Before each equation, ``observed_sends`` picks the waiting sends the
     equation could observe: it names a buffer or semaphore they change
     (``accesses``), unless the part it reads or writes is known while
     tracing to be apart from the part a send writes (``view_box``); and,
     to keep receipts into one buffer in issue order, earlier sends into
     the same buffers. ``flush`` delivers those in one exchange
     (``remote.deliver``).
  3. At the end of the jaxpr every send still waiting is delivered, except
     at the end of a branch of a switch that every device takes alike:
     those leave the switch as outputs (``slot_layout``, ``slots_of``,
     ``sends_of``) and wait on in the enclosing outbox.

Fidelity: none lost. A send lands before anything on the receiver could
read its destination or semaphore, and receipts keep their issue order, so
results and errors are those of delivering each op when issued; only the
number of collectives changes.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import remote
from fast_interpret.state import RefHandle


# --- Sends leaving a branch -------------------------------------------------


def _values(send: remote.Send) -> list:
  """What of ``send`` is traced: [valid, target (if needed), traced leaves]."""
  head = [jnp.asarray(send.valid, jnp.bool_)]
  if send.perm is None and isinstance(send.target, jax.core.Tracer):
    head.append(jnp.asarray(send.target, jnp.int32))
  return head + [leaf for leaf in jax.tree_util.tree_leaves(send.tree)
                 if isinstance(leaf, jax.core.Tracer)]


def slot_layout(per_branch) -> tuple[tuple[int, int, tuple], ...]:
  """``(branch, index, avals)`` of each send still waiting at a branch end.

  ``per_branch`` holds the sends each branch of a switch left waiting; the
  switch outputs the traced values of all of them (``slots_of``).
  """
  return tuple((k, j, tuple(jax.ShapeDtypeStruct(v.shape, v.dtype)
                            for v in _values(send)))
               for k, sends in enumerate(per_branch)
               for j, send in enumerate(sends))


def slots_of(layout, branch: int, sends) -> list:
  """Branch ``branch``'s outputs for ``layout``: its sends, zeros elsewhere."""
  out = []
  for k, j, avals in layout:
    if k == branch:
      out.append([v.astype(a.dtype) for v, a in
                  zip(_values(sends[j]), avals, strict=True)])
    else:  # Not this branch's: its valid flag is False.
      out.append([jnp.zeros(a.shape, a.dtype) for a in avals])
  return out


def sends_of(layout, per_branch, slots) -> list[remote.Send]:
  """The sends of ``layout`` outside the switch, from its outputs ``slots``.

  ``per_branch`` gives each send's static parts (permutation, receipt).
  """
  out = []
  for (k, j, _), values in zip(layout, slots, strict=True):
    like = per_branch[k][j]
    leaves, treedef = jax.tree_util.tree_flatten(like.tree)
    values = list(values)
    valid = values.pop(0)
    target = None
    if like.perm is None:
      target = (values.pop(0) if isinstance(like.target, jax.core.Tracer)
                else like.target)
    traced = [i for i, leaf in enumerate(leaves)
              if isinstance(leaf, jax.core.Tracer)]
    for i, v in zip(traced, values, strict=True):
      leaves[i] = v
    out.append(remote.Send(valid, target, like.perm, treedef.unflatten(leaves),
                    like.buffer_ids, like.apply,
                    same_valid=like.valid is True or like.same_valid,
                    boxes=like.boxes))
  return out


# --- Deferring sends ----------------------------------------------------------


def post(ctx, state, send: remote.Send):
  """Issues ``send``: into ``ctx.outbox`` when there is one, else delivered.

  A send waits in the outbox until something could observe it (see
  ``observed_sends``) or the jaxpr being evaluated ends, so that back-to-back
  remote ops become one exchange.
  """
  if ctx.outbox is None:
    return _deliver_into(ctx.mesh, state, [send])
  ctx.outbox.append(send)
  return state


def flush(ctx, state, sends=None):
  """Delivers ``sends`` (default: all) waiting in ``ctx.outbox``."""
  sends = list(ctx.outbox or ()) if sends is None else sends
  if not sends:
    return state
  ctx.outbox[:] = [s for s in ctx.outbox if all(s is not t for t in sends)]
  return _deliver_into(ctx.mesh, state, sends)


def _deliver_into(mesh, state, sends):
  ids = sorted(set().union(*(s.buffer_ids for s in sends)))
  buffers = remote.deliver(mesh, sends, {i: state.read(i) for i in ids})
  for i in ids:
    state = state.write(i, buffers[i])
  return state


def observed_sends(ctx, eqn, invals) -> list[remote.Send]:
  """The sends in ``ctx.outbox`` that must land before ``eqn`` runs.

  Those whose buffers ``eqn`` may read or change (``accesses``; a part of
  a buffer known while tracing to be apart from what a send writes does not
  count), and, to keep receipts into one buffer in issue order, the earlier
  sends into a buffer of one of those.
  """
  if not ctx.outbox:
    return []
  found = {}
  chosen = [False] * len(ctx.outbox)
  for i, send in enumerate(ctx.outbox):
    for bid in send.buffer_ids:
      if bid not in found:
        found[bid] = accesses(eqn, invals, bid)
      if _overlaps(dict(send.boxes).get(bid), found[bid]):
        chosen[i] = True
  for i in reversed(range(len(chosen))):
    if chosen[i]:
      for j in range(i):
        if ctx.outbox[j].buffer_ids & ctx.outbox[i].buffer_ids:
          chosen[j] = True
  return [s for s, c in zip(ctx.outbox, chosen, strict=True) if c]


def _overlaps(box, found) -> bool:
  if found is None:
    return True
  return any(not _apart(box, other) for other in found)


def _apart(a, b) -> bool:
  """Whether two boxes are sure not to share an element."""
  if a is None or b is None or len(a) != len(b):
    return False
  return any(x is not None and y is not None and (x[1] <= y[0] or y[1] <= x[0])
             for x, y in zip(a, b))


def _static_int(x) -> int | None:
  if isinstance(x, _jax.Literal):
    x = x.val
  if isinstance(x, (jax.core.Tracer, _jax.Var)):
    return None
  try:
    a = np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None
  if a.ndim or not np.issubdtype(a.dtype, np.integer):
    return None
  return int(a)


def view_box(transforms) -> tuple | None:
  """``[lo, hi)`` per dimension (None: not known while tracing) of a view.

  None unless the view is one plain indexer into its buffer.
  """
  if len(transforms) != 1 or not isinstance(transforms[0], _jax.NDIndexer):
    return None
  box = []
  for idx in transforms[0].indices:
    if isinstance(idx, _jax.Slice):
      start, size, stride = (_static_int(idx.start), _static_int(idx.size),
                             _static_int(idx.stride))
      known = None not in (start, size, stride)
      box.append((start, start + max(size - 1, 0) * stride + 1)
                 if known else None)
    else:
      i = _static_int(idx)
      box.append(None if i is None else (i, i + 1))
  return tuple(box)


_MEMORY = (_jax.get_p, _jax.swap_p, _jax.addupdate_p)


def accesses(eqn, invals, bid) -> list | None:
  """Boxes of buffer ``bid`` that ``eqn`` may read or change; None: any.

  A remote DMA reads only its source, a remote signal nothing here;
  semaphore adds commute with the receipts waiting. Branches of a ``cond``
  are looked into; any other use counts as the whole buffer.
  """
  if eqn.primitive is _jax.dma_start_p:
    src, _, _, _, device_id = _jax.tree_unflatten(eqn.params["tree"], invals)
    if device_id is not None:
      return [_handle_box(src)] if _buffer_id(src) == bid else []
  elif eqn.primitive is _jax.semaphore_signal_p and _jax.tree_unflatten(
      eqn.params["args_tree"], invals)[3] is not None:
    return []
  mine = [k for k, v in enumerate(invals) if _buffer_id(v) == bid]
  if not mine:
    return []
  if eqn.primitive in _MEMORY and mine == [0]:
    ref = invals[0]
    transforms = _jax.tree_unflatten(eqn.params["tree"], invals[_first_index(
        eqn):])
    return [view_box((*ref.transforms, *transforms))]
  if eqn.primitive is _jax.cond_p and all(
      not getattr(invals[k], "transforms", ()) for k in mine):
    return _cond_accesses(eqn, mine)
  return None


def _cond_accesses(eqn, positions) -> list | None:
  """``accesses`` of the cond operands at ``positions`` by its branches."""
  found = []
  for branch in eqn.params["branches"]:
    for k in positions:
      # Branch invars omit the cond's first operand, the branch index.
      inner = _jaxpr_accesses(branch.jaxpr, branch.jaxpr.invars[k - 1])
      if inner is None:
        return None
      found += inner
  return found


def _first_index(eqn) -> int:
  return 2 if eqn.primitive is not _jax.get_p else 1


def _handle_box(ref):
  handle = ref if isinstance(ref, RefHandle) else ref.ref
  return view_box((*handle.transforms, *getattr(ref, "transforms", ())))


def _jaxpr_accesses(jaxpr, var) -> list | None:
  """``accesses`` of the ref ``var`` by the equations of ``jaxpr``."""
  found = []
  for eqn in jaxpr.eqns:
    uses = [k for k, v in enumerate(eqn.invars) if v is var]
    if not uses:
      continue
    if eqn.primitive in _MEMORY and uses == [0]:
      transforms = _jax.tree_unflatten(eqn.params["tree"],
                                       eqn.invars[_first_index(eqn):])
      found.append(view_box(tuple(transforms)))
    elif eqn.primitive is _jax.dma_start_p and remote.is_remote_eqn(eqn):
      src = _jax.tree_unflatten(eqn.params["tree"], eqn.invars)[0]
      if getattr(src, "ref", src) is var:
        found.append(view_box(tuple(getattr(src, "transforms", ()))))
    elif eqn.primitive is _jax.semaphore_signal_p and remote.is_remote_eqn(eqn):
      continue
    elif eqn.primitive is _jax.cond_p and 0 not in uses:
      inner = _cond_accesses(eqn, uses)
      if inner is None:
        return None
      found += inner
    else:
      return None
  return found


def _buffer_id(ref) -> int | None:
  if not isinstance(ref, RefHandle):
    ref = getattr(ref, "ref", None)  # A TransformedRef's handle, if one.
  return ref.buffer_id if isinstance(ref, RefHandle) else None
