"""Execution modes: how a case is run on CPU.

* ``xla``: the case's plain-jnp reference, compiled by XLA (no Pallas).
* ``interpret``: ``interpret=True``, JAX's HLO interpreter for Pallas.
* ``tpu_interpret``: ``interpret=pltpu.InterpretParams()``, JAX's TPU
  interpret mode (simulated memories behind host callbacks).
* ``fast``: ``interpret=fast_interpret.FastInterpretParams()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from jax.experimental.pallas import tpu as pltpu


def _fast_params() -> Any:
    import fast_interpret  # Imported lazily: it may not exist (yet).

    return fast_interpret.FastInterpretParams()


@dataclasses.dataclass(frozen=True)
class Mode:
    """A way to run a case; ``make_interpret`` is None for plain XLA."""

    name: str
    description: str
    make_interpret: Callable[[], Any] | None


MODES: dict[str, Mode] = {
    m.name: m for m in (
        Mode("xla", "jnp reference compiled by XLA", None),
        Mode("interpret", "interpret=True (HLO interpreter)", lambda: True),
        Mode("tpu_interpret", "interpret=pltpu.InterpretParams()",
             pltpu.InterpretParams),
        Mode("fast", "interpret=fast_interpret.FastInterpretParams()",
             _fast_params),
    )
}


@contextlib.contextmanager
def forced_interpret(value: Any) -> Iterator[None]:
    """Forces every pallas_call traced inside to use ``interpret=value``.

    ``pltpu.force_tpu_interpret_mode`` only swaps a config value that
    ``pallas_call`` reads at trace time, so it works for ``True`` (HLO
    interpreter), ``InterpretParams`` and ``FastInterpretParams`` alike.
    """
    with pltpu.force_tpu_interpret_mode(value):
        yield
