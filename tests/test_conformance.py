"""benchmarks/conformance.py: for every preset, one step's gradient under 1 or 2 ranks, one
micro-batch or micro-batches of 1 row (gradient accumulation), and for a late worker batch sampled
with identical weights and top_p < 1, equals the full batch's autograd gradient; the 2-rank
token-mean metrics equal the 1-rank ones; docs/algorithms.md carries the table."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import conformance  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return conformance.measure(tmp_path_factory.mktemp("conformance"))


def test_every_layout_applies_the_full_batch_gradient(result):
    for preset, cells in result["cells"].items():
        scale = result["grad_max"][preset]
        assert scale > 0.1, f"{preset}: a gradient of its own size"
        for layout, diff in cells.items():
            assert diff < 1e-5 * max(scale, 1.0), f"{preset}, {layout}: max |difference| {diff:.3g}"


def test_token_mean_metrics_do_not_depend_on_the_layout(result):
    for preset, by_layout in result["metrics"].items():
        want = by_layout["1 rank, no accumulation"]
        assert want["kl"] > 0.1
        for layout, got in by_layout.items():
            for k, v in want.items():
                assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (preset, layout, k)


def test_the_docs_table_has_every_preset_and_layout():
    text = (ROOT / "docs" / "algorithms.md").read_text()
    header = "| preset | max \\|g\\| | " + " | ".join(conformance.LAYOUTS) + " |"
    assert header in text, "docs/algorithms.md: the conformance table's header"
    rows = text.split(header, 1)[1].strip().splitlines()[1:]
    names = [r.split("|")[1].strip() for r in rows if r.startswith("| ")]
    assert names[:len(conformance.PRESETS)] == list(conformance.PRESETS)
