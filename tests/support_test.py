"""The support table in docs/support.md matches the code, and means it."""

import os

from absl.testing import absltest
import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

import fast_interpret
from fast_interpret import _jax
from fast_interpret import support

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SupportTableTest(absltest.TestCase):

  def test_docs_table_matches_the_code(self):
    with open(os.path.join(REPO, "docs", "support.md")) as f:
      page = f.read()
    self.assertIn(support.markdown(), page,
                  "docs/support.md is stale: paste the output of "
                  "`python -m fast_interpret.support` into it")

  def test_every_pallas_primitive_is_classified(self):
    rows = support.rows()
    self.assertEqual({r.name for r in rows},
                     {p.name for p in _jax.pallas_primitive_set()})
    for r in rows:
      self.assertIn(r.fast, ("rule", "pure", "no"), r)

  def test_a_primitive_marked_no_fails_at_trace_time_naming_itself(self):
    no = {r.name for r in support.rows() if r.fast == "no"}
    self.assertIn("matmul_pop", no)
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

    def kernel(o_ref):
      o_ref[...] = pltpu.matmul_pop(0, o_ref.shape, jnp.float32, 0)

    call = pl.pallas_call(kernel,
                          out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                          interpret=fast_interpret.FastInterpretParams())
    with self.assertRaisesRegex(fast_interpret.UnsupportedPrimitiveError,
                                "unsupported primitive: `matmul_pop`"):
      jax.jit(call).lower()


if __name__ == "__main__":
  absltest.main()
