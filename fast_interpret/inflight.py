"""DMAs that land at the wait: ``dma_execution_mode="on_wait"``.

With ``on_wait``, every buffer some DMA writes (a *destination*) gets two
companion buffers in ``KernelState``, allocated where the destination is
(the pallas_call's operands and scratch, or a ``run_scoped`` body):

  * a *shadow* of the same shape and dtype, holding the data of copies in
    flight into it;
  * a *tag* array (int32, same shape): 0 where nothing is in flight, else the
    id of the DMA semaphore that the copy in flight there will signal.

``copy.start()`` reads the source, writes it into the destination's shadow and
tags the destination elements with its semaphore; the destination itself is
untouched, so a read before the wait sees the old data. ``copy.wait()`` (a
``dma_wait`` on semaphore *s*) first lands every element tagged *s* in every
destination (shadow to destination, tag cleared), then takes its bytes off
*s*. So a copy lands at the first wait on its semaphore: a schedule a TPU may
run, and the latest one.

The companions are ordinary buffers: loops, conds, the grid loop and the
megacore driver carry them like any written buffer (they are private to a
simulated core, like its DMA engine). Nothing is allocated in ``eager`` mode.

Differences from ``pltpu.InterpretParams(dma_execution_mode="on_wait")``:
the source is read at ``start`` (JAX reads it at the wait too), and a wait
lands every copy in flight on its semaphore (JAX runs pending copies, last
started first, only until the count suffices). A kernel that writes a DMA's
source before waiting on it therefore sees the old source here. DMAs with
``add=True``, and DMAs whose destination view bitcasts or reshapes the
buffer, still land at start.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import errors
from fast_interpret import views
from fast_interpret.state import KernelState, RefHandle

# Semaphore ids in the tag arrays: the semaphore buffer id plus its flat
# index times this (so a tag names both), offset by one so 0 means "none".
_SEM_ID_STRIDE = 1 << 16


@dataclasses.dataclass(frozen=True)
class InFlight:
  """Buffer ids of a destination's companions: its shadow and its tags."""

  shadow_id: int
  tag_id: int


def enabled(params) -> bool:
  return getattr(params, "dma_execution_mode", "eager") == "on_wait"


# --- Which refs are DMA destinations? --------------------------------------


def destinations(jaxpr: _jax.Jaxpr) -> frozenset[int]:
  """Positions in ``constvars + invars`` of refs some DMA in ``jaxpr`` writes.

  Follows refs into nested cond, while, scan, jit and run_scoped bodies.
  """
  return _destinations(jaxpr)


@functools.lru_cache(maxsize=1024)
def _destinations(jaxpr: _jax.Jaxpr) -> frozenset[int]:
  position = {v: i for i, v in enumerate([*jaxpr.constvars, *jaxpr.invars])}
  found = set()
  for eqn in jaxpr.eqns:
    for var in _eqn_destinations(eqn):
      if var in position:
        found.add(position[var])
  return frozenset(found)


def _inner(jaxpr, sub_invars, positions) -> list[Any]:
  """The eqn operands behind ``positions`` of a sub-jaxpr's inputs."""
  n_const = len(jaxpr.constvars)
  return [sub_invars[p - n_const] for p in positions
          if 0 <= p - n_const < len(sub_invars)]


def _eqn_destinations(eqn: _jax.JaxprEqn) -> list[Any]:
  """The operands of ``eqn`` that a DMA in it (or nested in it) writes."""
  prim, params, invars = eqn.primitive, eqn.params, eqn.invars
  if prim is _jax.dma_start_p:
    _, dst, *_ = _jax.tree_unflatten(params["tree"], invars)
    return [getattr(dst, "ref", dst)]
  if prim is _jax.cond_p:
    out = []
    for branch in params["branches"]:
      out += _inner(branch.jaxpr, invars[1:], _destinations(branch.jaxpr))
    return out
  if prim is _jax.while_p:
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    body = params["body_jaxpr"].jaxpr
    return _inner(body, [*invars[nc:nc + nb], *invars[nc + nb:]],
                  _destinations(body))
  if prim in (_jax.scan_p, _jax.jit_p):
    body = params["jaxpr"].jaxpr
    return _inner(body, invars, _destinations(body))
  if prim is _jax.run_scoped_p:
    body = params["jaxpr"]
    # The body's constvars are the eqn's operands; its invars are the
    # allocations, handled by the run_scoped rule.
    return [invars[p] for p in _destinations(body)
            if p < len(body.constvars)]
  return []


def allocate(state: KernelState, handles, positions, new_id
             ) -> tuple[KernelState, dict[int, InFlight]]:
  """Adds companions for the handles at ``positions``; returns the map."""
  table = {}
  for p in sorted(positions):
    handle = handles[p]
    # Input block buffers are refilled every grid step: DMAs into them stay
    # eager.
    if (not isinstance(handle, RefHandle) or handle.buffer_id in table
        or handle.buffer_id not in state.buffers):
      continue
    buf = state.read(handle.buffer_id)
    entry = InFlight(new_id(), new_id())
    state = state.add(entry.shadow_id, jnp.zeros(buf.shape, buf.dtype))
    state = state.add(entry.tag_id, jnp.zeros(buf.shape, jnp.int32))
    table[handle.buffer_id] = entry
  return state, table


def carried_ids(in_flight: Mapping[int, InFlight], state: KernelState,
                jaxpr: _jax.Jaxpr) -> set[int]:
  """Buffers a body must carry because it starts or waits on DMAs.

  A wait can land into any destination, not only those the body names.
  """
  if not in_flight or not _jax.uses_primitives(
      jaxpr, (_jax.dma_start_p, _jax.dma_wait_p)):
    return set()
  ids = set()
  for dst, entry in in_flight.items():
    ids |= {dst, entry.shadow_id, entry.tag_id}
  return ids & state.buffers.keys()


# --- start and wait ----------------------------------------------------------


def semaphore_tag(state: KernelState, sem: RefHandle, transforms) -> Any:
  """The id (an int32 scalar, never 0) of the DMA semaphore ``sem`` views."""
  buf = state.read(sem.buffer_id)
  if sem.buffer_id >= _SEM_ID_STRIDE:
    raise errors.InternalError("too many buffers for on_wait DMA tags.")
  flat = np.arange(buf.size, dtype=np.int32).reshape(buf.shape)
  index = views.read(flat, transforms)
  return (jnp.asarray(index, jnp.int32).reshape(()) * _SEM_ID_STRIDE
          + (sem.buffer_id + 1))


def can_defer(in_flight: Mapping[int, InFlight], dst: RefHandle, transforms,
              add: bool) -> bool:
  """Whether this DMA's copy can wait for its ``dma_wait`` (see module doc)."""
  return (dst.buffer_id in in_flight and not add
          and all(isinstance(t, _jax.NDIndexer) for t in transforms))


def start(state: KernelState, entry: InFlight, transforms, put, tag,
          report=None, fill=None) -> KernelState:
  """Puts a copy in flight: ``put(view)`` into the shadow, views tagged."""
  _, shadow = views.update(state.read(entry.shadow_id), transforms, put,
                           report, fill=fill)
  _, tags = views.update(
      state.read(entry.tag_id), transforms,
      lambda v: (None, jnp.full(v.shape, tag, jnp.int32)), fill=fill)
  return state.write(entry.shadow_id, shadow).write(entry.tag_id, tags)


def land(in_flight: Mapping[int, InFlight], state: KernelState, tag
         ) -> KernelState:
  """Lands every copy in flight that signals semaphore ``tag``."""
  for dst, entry in in_flight.items():
    if dst not in state.buffers:
      continue
    tags = state.read(entry.tag_id)
    arrived = tags == tag
    state = state.write(dst, jnp.where(arrived, state.read(entry.shadow_id),
                                       state.read(dst)))
    state = state.write(entry.tag_id, jnp.where(arrived, 0, tags))
  return state
