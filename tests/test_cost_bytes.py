"""bench-cost's storage figure measures the files the default router really writes."""

from __future__ import annotations

from clipzoo.bench.growth import vit_bytes_per_expert


def test_router_share_per_expert_falls_as_the_zoo_grows(tmp_path):
    few, many = vit_bytes_per_expert(tmp_path, dim=32, tasks=2), vit_bytes_per_expert(tmp_path, dim=32, tasks=6)
    assert few["router_kind"] == many["router_kind"] == "ranpac"
    assert few["stats"] == many["stats"] > 0  # the same synthetic task size: the same statistics bytes
    assert many["router"] < few["router"]  # one fixed-size scatter shared by more experts
    assert few["total"] == few["stats"] + few["router"]
