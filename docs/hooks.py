"""MkDocs hook: pages whose sources live outside `docs/`.

- `notebooks/*.ipynb`, the tutorials, rendered by mkdocs-jupyter from the committed
  notebooks (the docs build never executes them);
- `benchmarks/RESULTS.md`, with the plots it links (`benchmarks/results/*.png`), so
  its relative links keep working.

They are added with the repository root as their source folder, so their paths in
`nav` (and their URLs) are `notebooks/...` and `benchmarks/...`, and they stay where
the test suite and `make bench` write them: nothing is copied into `docs/`.
"""

from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("notebooks/*.ipynb", "benchmarks/RESULTS.md", "benchmarks/results/*.png")


@event_priority(100)  # before mkdocs-jupyter, which picks up the notebooks
def on_files(files: Files, config) -> Files:
    for pattern in SOURCES:
        for path in sorted(ROOT.glob(pattern)):
            files.append(
                File(
                    path.relative_to(ROOT).as_posix(),
                    src_dir=str(ROOT),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                )
            )
    return files
