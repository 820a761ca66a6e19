"""`ramba bench kernels`' plot on the CPU: times scaled to one call's tokens, the tile-size panel from the
`--block-tokens` fields."""

import matplotlib.image
import pytest

from ramba.bench.hsa import CALL_TOKENS, per_call, plot, tile_sizes


def _row(pattern, B, T, fwd, **more):
    return {"pattern": pattern, "B": B, "T": T, "tokens": B * T, "hsa_fwd_ms": fwd, "hsa_fwdbwd_ms": 3 * fwd, **more}


def _result(runs):
    return {"machine": {"gpu": "test GPU"}, "date": "2026-12-01T00:00:00", "runs": runs}


def test_times_are_scaled_to_one_call_and_tiles_sorted():
    full, half = _row("uniform", 64, 4096, 2.0), _row("uniform", 1, 131072, 1.5)
    assert full["tokens"] == CALL_TOKENS
    assert per_call(full, full["hsa_fwd_ms"]) == 2.0 and per_call(half, half["hsa_fwd_ms"]) == pytest.approx(3.0)
    row = _row("trained", 4, 65536, 2.9, hsa_bt8_fwd_ms=4.2, hsa_bt1_fwd_ms=5.4, hsa_bt2_fwd_ms=5.5)
    assert tile_sizes(row) == [(1, 5.4), (2, 5.5), (4, 2.9), (8, 4.2)]  # 4: the default tile for 16 heads a kv head
    assert tile_sizes(_row("trained", 4, 65536, 2.9)) == [(4, 2.9)]


def test_plot_adds_the_tile_panel_only_when_tiles_were_timed(tmp_path):
    runs = [_row(p, 4, 65536, 2.0 + i) for i, p in enumerate(("uniform", "recency", "trained"))]
    plot(_result(runs), tmp_path / "two.png")
    for r in runs:
        r.update(hsa_bt1_fwd_ms=5.0, hsa_bt8_fwd_ms=4.0)
    plot(_result(runs), tmp_path / "three.png")
    two, three = matplotlib.image.imread(tmp_path / "two.png"), matplotlib.image.imread(tmp_path / "three.png")
    assert two.shape[0] == three.shape[0] and three.shape[1] == pytest.approx(1.5 * two.shape[1], rel=0.01)
