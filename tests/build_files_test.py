"""Checks that BUILD.bazel lists every module and every test (no Bazel needed).

BUILD.bazel names its sources explicitly, so a new file is easy to forget.
This test parses it (Starlark BUILD files are Python syntax) and checks:

* every ``fast_interpret/*.py`` module is in the ``srcs`` of a ``py_library``;
* every ``tests/*_test.py`` file is the single source of exactly one
  ``py_test`` named after it (``tests/foo_test.py`` -> ``:foo_test``);
* every other ``tests/*.py`` helper is in the ``srcs`` of a ``py_library``;
* every file named in ``srcs`` or ``data`` exists (no stale entries; not
  checked under ``bazel test``, where a missing file fails the build);
* test names are unique and tests depend on the package library.

Run:  python -m pytest tests/build_files_test.py -q
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import os

from absl.testing import absltest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(REPO, "BUILD.bazel")


@dataclasses.dataclass(frozen=True)
class Rule:
  kind: str
  name: str
  srcs: tuple[str, ...]
  data: tuple[str, ...]
  deps: tuple[str, ...]
  line: int


def _strings(node: ast.AST | None) -> tuple[list[str], bool]:
  """String literals in a list expression (``[...] + glob([...])``).

  Returns (literal strings outside glob(), whether a glob() is present).
  """
  if node is None:
    return [], False
  if isinstance(node, ast.List):
    out = []
    for elt in node.elts:
      if not (isinstance(elt, ast.Constant) and isinstance(elt.value, str)):
        raise ValueError(f"line {node.lineno}: only string literals are "
                         "supported in a list")
      out.append(elt.value)
    return out, False
  if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
    left, lglob = _strings(node.left)
    right, rglob = _strings(node.right)
    return left + right, lglob or rglob
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and node.func.id == "glob"):
    return [], True
  raise ValueError(f"line {getattr(node, 'lineno', '?')}: unsupported "
                   f"expression {ast.dump(node)[:80]}")


def parse_build(text: str) -> list[Rule]:
  """The py_library / py_test rules of a BUILD file, in order."""
  rules = []
  for node in ast.walk(ast.parse(text, filename="BUILD.bazel")):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in ("py_library", "py_test", "py_binary")):
      continue
    kwargs = {kw.arg: kw.value for kw in node.keywords}
    name = kwargs.get("name")
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
      raise ValueError(f"line {node.lineno}: {node.func.id} without a "
                       "literal name")
    srcs, srcs_glob = _strings(kwargs.get("srcs"))
    if srcs_glob:
      raise ValueError(f"line {node.lineno}: {name.value} uses glob() in "
                       "srcs; list the files by name")
    data, _ = _strings(kwargs.get("data"))
    deps, _ = _strings(kwargs.get("deps"))
    rules.append(Rule(node.func.id, name.value, tuple(srcs), tuple(data),
                      tuple(deps), node.lineno))
  return sorted(rules, key=lambda r: r.line)


def _imported_modules(source: str) -> set[str]:
  """Modules a Python source imports: ``a.b`` gives ``a`` and ``a.b``."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      full = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      full = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for name in full:
      parts = name.split(".")
      names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
  return names


def _repo_files(pattern: str) -> list[str]:
  return sorted(os.path.relpath(p, REPO).replace(os.sep, "/")
                for p in glob.glob(os.path.join(REPO, pattern)))


class BuildFilesTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    with open(BUILD, encoding="utf-8") as f:
      cls.rules = parse_build(f.read())
    cls.libraries = [r for r in cls.rules if r.kind == "py_library"]
    cls.tests = [r for r in cls.rules if r.kind == "py_test"]

  def test_found_the_rules(self):
    self.assertIn("fast_interpret", [r.name for r in self.libraries])
    self.assertNotEmpty(self.tests)

  def test_every_package_module_is_in_a_library(self):
    modules = _repo_files("fast_interpret/*.py")
    self.assertIn("fast_interpret/__init__.py", modules)
    listed = {s for r in self.libraries for s in r.srcs}
    missing = [m for m in modules if m not in listed]
    self.assertEqual(missing, [], "fast_interpret modules missing from the "
                     "srcs of a py_library in BUILD.bazel")

  def test_every_test_file_has_its_py_test(self):
    by_src = {}
    for rule in self.tests:
      self.assertLen(rule.srcs, 1, f"py_test {rule.name}: one source file")
      by_src.setdefault(rule.srcs[0], []).append(rule.name)
    missing = []
    for path in _repo_files("tests/*_test.py"):
      expected = os.path.basename(path).removesuffix(".py")
      names = by_src.get(path, [])
      if not names:
        missing.append(f"{path} (add py_test(name = {expected!r}, ...))")
        continue
      self.assertEqual(names, [expected],
                       f"{path} must be the source of exactly one py_test "
                       f"named {expected!r}")
    self.assertEqual(missing, [], "tests missing from BUILD.bazel")

  def test_test_helpers_are_in_a_library(self):
    # __init__.py: Bazel creates empty ones in the runfiles of a py_test.
    helpers = [p for p in _repo_files("tests/*.py")
               if not p.endswith(("_test.py", "/__init__.py"))]
    listed = {s for r in self.libraries for s in r.srcs}
    missing = [p for p in helpers if p not in listed]
    self.assertEqual(missing, [], "test helpers missing from the srcs of a "
                     "py_library in BUILD.bazel")

  def test_listed_files_exist(self):
    if "TEST_SRCDIR" in os.environ and "TEST_WORKSPACE" in os.environ:
      self.skipTest("under Bazel, whose build fails on a missing file; the "
                    "runfiles hold only this test's own data")
    stale = [f"{r.name}: {path}" for r in self.rules
             for path in (*r.srcs, *r.data)
             if not os.path.exists(os.path.join(REPO, path))]
    self.assertEqual(stale, [], "BUILD.bazel names files that do not exist")

  def test_names_are_unique(self):
    names = [r.name for r in self.rules]
    self.assertCountEqual(names, set(names))

  def test_tests_that_import_the_package_depend_on_it(self):
    for rule in self.tests:
      with open(os.path.join(REPO, rule.srcs[0]), encoding="utf-8") as f:
        imported = _imported_modules(f.read())
      if "fast_interpret" in imported:
        self.assertIn(":fast_interpret", rule.deps, rule.name)
      if "test_util" in imported or "tests.test_util" in imported:
        self.assertIn(":test_util", rule.deps, rule.name)


class ParseBuildTest(absltest.TestCase):

  def test_parses_lists_concatenation_and_glob(self):
    rules = parse_build(
        'py_library(name = "lib", srcs = ["a.py", "b.py"])\n'
        'py_test(name = "a_test", srcs = ["a_test.py"],\n'
        '        data = ["x.md"] + glob(["docs/*.md"]), deps = [":lib"])\n')
    self.assertEqual([(r.kind, r.name) for r in rules],
                     [("py_library", "lib"), ("py_test", "a_test")])
    self.assertEqual(rules[0].srcs, ("a.py", "b.py"))
    self.assertEqual(rules[1].data, ("x.md",))
    self.assertEqual(rules[1].deps, (":lib",))

  def test_rejects_glob_in_srcs(self):
    with self.assertRaisesRegex(ValueError, "glob"):
      parse_build('py_library(name = "lib", srcs = glob(["*.py"]))\n')


if __name__ == "__main__":
  absltest.main()
