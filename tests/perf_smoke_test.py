"""CI-sized performance guard: the optimised-HLO size of the sort kernel.

Wall time is noisy on shared CI machines; the number of instructions in the
optimised HLO of the (8,128) bitonic sort under fast interpret is not, and it
tracks compile cost. The test fails only on a large regression (more than the
tolerance in benchmarks/hlo_budget.json times the stored budget).
"""

from absl.testing import absltest

from benchmarks import smoke


class HloBudgetTest(absltest.TestCase):

  def test_sort_hlo_within_budget(self):
    result = smoke.check_hlo_budget()
    self.assertIsNotNone(result.budget, "no HLO budget stored")
    self.assertTrue(result.correct, "the sort kernel gave a wrong answer")
    self.assertTrue(result.passed, result.summary())


if __name__ == "__main__":
  absltest.main()
