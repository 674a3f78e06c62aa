"""Runs every ```python code block in docs/*.md and README.md.

How blocks run:

* The blocks of one page run in order, in one namespace shared by that page
  only: a later block may use what an earlier block on the same page
  defined. Every page starts from a fresh namespace, so pages are
  independent of each other and of the order they run in.
* Only blocks fenced exactly as ```python run. Shell commands, program
  output and sketches are fenced as ```bash or ```text and are not run.
* Each block is compiled with the page's path as its file name and its
  real line numbers, so a traceback points at the Markdown line that failed.
* Pages run with the ``FAST_INTERPRET_*`` environment variables removed and
  with no global interpret mode set (a ``pytest --fast-interpret`` session
  sets one), so that they see the documented defaults; both are restored
  afterwards, as is any global mode a page leaves behind.

Blocks that are known not to run are listed in ``KNOWN_BROKEN`` with the
reason; such a block must still fail (when it is fixed, remove its entry).

The test also checks that every relative link in docs/*.md points at a file
or directory that exists.

Run:  python -m pytest tests/docs_test.py -q
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import traceback

from absl.testing import absltest
from absl.testing import parameterized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")

# (page relative to the repository, a line of the block) -> why it cannot run.
KNOWN_BROKEN: dict[tuple[str, str], str] = {}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclasses.dataclass(frozen=True)
class Block:
  page: str  # relative to the repository
  line: int  # 1-based line of the first line of code
  language: str
  source: str

  @property
  def label(self) -> str:
    return f"{self.page}:{self.line}"


def pages() -> list[str]:
  """Pages whose python blocks run, relative to the repository."""
  found = sorted(os.path.relpath(p, REPO)
                 for p in glob.glob(os.path.join(DOCS, "*.md")))
  return found + ["README.md"]


def extract_blocks(text: str, page: str) -> list[Block]:
  """Every fenced code block of a Markdown text, in order."""
  blocks = []
  lines = text.splitlines()
  i = 0
  while i < len(lines):
    m = _FENCE.match(lines[i])
    if not m:
      i += 1
      continue
    fence, indent = m.group("fence"), len(m.group("indent"))
    language = m.group("info").strip().split(" ")[0].lower()
    body, j = [], i + 1
    while j < len(lines):
      close = _FENCE.match(lines[j])
      if (close and close.group("fence")[0] == fence[0]
          and len(close.group("fence")) >= len(fence)
          and not close.group("info").strip()):
        break
      line = lines[j]
      body.append(line[indent:] if line[:indent].isspace() else line)
      j += 1
    else:
      raise ValueError(f"{page}:{i + 1}: code fence is never closed")
    blocks.append(Block(page, i + 2, language, "\n".join(body) + "\n"))
    i = j + 1
  return blocks


def python_blocks(page: str) -> list[Block]:
  with open(os.path.join(REPO, page), encoding="utf-8") as f:
    text = f.read()
  return [b for b in extract_blocks(text, page) if b.language == "python"]


def known_broken_reason(block: Block) -> str | None:
  for (page, marker), reason in KNOWN_BROKEN.items():
    if page == block.page and marker in block.source:
      return reason
  return None


def run_block(block: Block, namespace: dict) -> None:
  # Leading newlines keep line numbers in tracebacks equal to the page's.
  code = compile("\n" * (block.line - 1) + block.source,
                 os.path.join(REPO, block.page), "exec")
  exec(code, namespace)  # pylint: disable=exec-used


class _CleanEnvironment:
  """No FAST_INTERPRET_* variables and no global interpret mode inside."""

  def __enter__(self):
    from fast_interpret import _jax  # pylint: disable=g-import-not-at-top
    self._config = _jax.interpret_mode_config
    self._saved_env = {k: v for k, v in os.environ.items()
                       if k.startswith("FAST_INTERPRET_")}
    for k in self._saved_env:
      del os.environ[k]
    self._saved_mode = self._config.get_global()
    self._config.set_global(None)
    return self

  def __exit__(self, *exc):
    for k in [k for k in os.environ if k.startswith("FAST_INTERPRET_")]:
      del os.environ[k]
    os.environ.update(self._saved_env)
    self._config.set_global(self._saved_mode)
    return False


def _page_params():
  return [(re.sub(r"\W", "_", page.removesuffix(".md")), page)
          for page in pages()]


class DocsCodeBlocksTest(parameterized.TestCase):

  @parameterized.named_parameters(*_page_params())
  def test_python_blocks_run(self, page):
    blocks = python_blocks(page)
    namespace = {"__name__": "__docs__", "__file__": os.path.join(REPO, page)}
    with _CleanEnvironment():
      for block in blocks:
        reason = known_broken_reason(block)
        try:
          run_block(block, namespace)
        except Exception:  # pylint: disable=broad-except
          if reason is not None:
            continue
          self.fail(f"the ```python block at {block.label} failed:\n"
                    f"{traceback.format_exc()}")
        if reason is not None:
          self.fail(f"the ```python block at {block.label} is listed in "
                    f"KNOWN_BROKEN ({reason}) but now runs: remove its entry "
                    "from tests/docs_test.py")

  def test_known_broken_entries_still_match_a_block(self):
    for (page, marker) in KNOWN_BROKEN:
      blocks = python_blocks(page) if os.path.exists(
          os.path.join(REPO, page)) else []
      self.assertTrue(
          any(marker in b.source for b in blocks),
          f"KNOWN_BROKEN entry for {page} ({marker!r}) matches no ```python "
          "block any more: remove it from tests/docs_test.py")

  def test_docs_have_python_blocks(self):
    counted = {page: len(python_blocks(page)) for page in pages()}
    self.assertIn(os.path.join("docs", "index.md"), counted)
    self.assertGreaterEqual(sum(counted.values()), 10, counted)

  def test_relative_links_resolve(self):
    missing = []
    for path in sorted(glob.glob(os.path.join(DOCS, "*.md"))):
      with open(path, encoding="utf-8") as f:
        text = f.read()
      # Links inside code blocks are code, not links.
      text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
      for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
          continue  # a URL or an anchor on the same page
        file_part = target.split("#", 1)[0]
        resolved = os.path.normpath(os.path.join(os.path.dirname(path),
                                                 file_part))
        if not os.path.exists(resolved):
          missing.append(f"{os.path.relpath(path, REPO)}: {target}")
    self.assertEqual(missing, [], "relative links to missing files")


class ExtractBlocksTest(absltest.TestCase):

  def test_fences_languages_and_line_numbers(self):
    text = "\n".join([
        "# Title",               # 1
        "```python",             # 2
        "a = 1",                 # 3
        "```",                   # 4
        "````text",              # 5
        "```python",             # 6
        "not code",              # 7
        "```",                   # 8
        "````",                  # 9
        "  ```python",           # 10
        "  b = a + 1",           # 11
        "  ```",                 # 12
    ])
    blocks = extract_blocks(text, "page.md")
    self.assertEqual([(b.language, b.line) for b in blocks],
                     [("python", 3), ("text", 6), ("python", 11)])
    self.assertEqual(blocks[0].source, "a = 1\n")
    self.assertEqual(blocks[1].source, "```python\nnot code\n```\n")
    self.assertEqual(blocks[2].source, "b = a + 1\n")

  def test_unclosed_fence_is_an_error(self):
    with self.assertRaises(ValueError):
      extract_blocks("```python\nx = 1\n", "page.md")

  def test_traceback_points_at_the_page_line(self):
    block = Block("docs/x.md", 7, "python", "a = 1\nraise KeyError('here')\n")
    try:
      run_block(block, {})
    except KeyError:
      frame = traceback.extract_tb(__import__("sys").exc_info()[2])[-1]
      self.assertEqual(frame.lineno, 8)
      self.assertTrue(frame.filename.endswith(os.path.join("docs", "x.md")))
    else:
      self.fail("expected KeyError")


if __name__ == "__main__":
  absltest.main()
