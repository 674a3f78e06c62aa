"""Exceptions raised by fast_interpret.

Trace-time problems (a primitive we cannot simulate, an unsupported option)
raise while the kernel is traced. Every message starts with a stable prefix
that tests and users can match: ``fast_interpret: <kind>:``.
"""

from __future__ import annotations


class FastInterpretError(Exception):
  """Base class of every error fast_interpret raises on purpose."""


# Why some primitives have no rule, by primitive name.
_WHY_UNSUPPORTED = {
    "get_global": "Pallas TPU has no lowering for pl.get_global in jax "
                  "0.10.2; only Mosaic GPU does",
    "matmul_push_rhs": "explicit MXU staging registers are not modelled; "
                       "use jnp.dot / lax.dot_general",
    "matmul_acc_lhs": "explicit MXU accumulators are not modelled; use "
                      "jnp.dot / lax.dot_general",
    "matmul_pop": "explicit MXU accumulators are not modelled; use jnp.dot "
                  "/ lax.dot_general",
    "emit_pipeline": "the experimental emit_pipeline primitive "
                     "(jax_use_emit_pipeline_primitive=True) is not "
                     "modelled; pltpu.emit_pipeline runs with the flag off, "
                     "its default",
}


class UnsupportedPrimitiveError(FastInterpretError, NotImplementedError):
  """The kernel uses a primitive that fast interpret cannot simulate."""

  def __init__(self, eqn, kernel_name: str, why: str = ""):
    self.primitive = eqn.primitive
    why = why or _WHY_UNSUPPORTED.get(eqn.primitive.name, "")
    msg = (
        f"fast_interpret: unsupported primitive: `{eqn.primitive.name}` in "
        f"kernel {kernel_name!r}"
        + (f" ({why})" if why else "")
        + ". Run this kernel with interpret=pltpu.InterpretParams() (full "
        "simulation) or interpret=True instead, or file an issue with the "
        "kernel attached.")
    super().__init__(msg)


class UnsupportedFeatureError(FastInterpretError, NotImplementedError):
  """The kernel uses a Pallas feature that fast interpret does not model."""

  def __init__(self, what: str, kernel_name: str, hint: str = ""):
    super().__init__(
        f"fast_interpret: unsupported feature: {what} in kernel "
        f"{kernel_name!r}. "
        + (hint or "Run it with interpret=pltpu.InterpretParams() instead."))


class InternalError(FastInterpretError, AssertionError):
  """An invariant of the interpreter broke: a bug in fast_interpret."""

  def __init__(self, what: str):
    super().__init__(f"fast_interpret: internal error: {what} Please report it.")
