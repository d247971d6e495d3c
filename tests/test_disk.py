"""Reading MinIO's disk figures, and which of budget and disk decides how full the store is."""

from __future__ import annotations

import pytest

from services.store.disk import Disk, DiskUnavailable, Usage, parse_disk

GB = 1_000_000_000

# The shape of MinIO's /minio/v2/metrics/cluster page (abridged).
CLUSTER_PAGE = """\
# HELP minio_cluster_bucket_total Total number of buckets in the cluster
# TYPE minio_cluster_bucket_total gauge
minio_cluster_bucket_total{server="127.0.0.1:9000"} 2
# HELP minio_cluster_capacity_raw_free_bytes Total free capacity online in the cluster
# TYPE minio_cluster_capacity_raw_free_bytes gauge
minio_cluster_capacity_raw_free_bytes{server="127.0.0.1:9000"} 4.1e+11
# HELP minio_cluster_capacity_usable_free_bytes Total free usable capacity online in the cluster
# TYPE minio_cluster_capacity_usable_free_bytes gauge
minio_cluster_capacity_usable_free_bytes{server="127.0.0.1:9000"} 2.5e+11
# HELP minio_cluster_capacity_usable_total_bytes Total usable capacity online in the cluster
# TYPE minio_cluster_capacity_usable_total_bytes gauge
minio_cluster_capacity_usable_total_bytes{server="127.0.0.1:9000"} 1e+12
# HELP minio_node_process_uptime_seconds Uptime for MinIO process per node in seconds
# TYPE minio_node_process_uptime_seconds gauge
minio_node_process_uptime_seconds{server="127.0.0.1:9000"} 1234
"""


def test_the_usable_capacity_and_free_space_are_read() -> None:
    disk = parse_disk(CLUSTER_PAGE, read_at=5.0)
    assert (disk.total_bytes, disk.free_bytes, disk.used_bytes) == (1_000 * GB, 250 * GB, 750 * GB)
    assert disk.fresh(64.0) and not disk.fresh(66.0)


@pytest.mark.parametrize("page, words", [
    ("# TYPE x gauge\nx 1\n", "no minio_cluster_capacity_usable_total_bytes or"),
    ("this is { not prometheus", "not in the Prometheus text format"),
    (CLUSTER_PAGE.replace("2.5e+11", "2e+12"), "implausible"),
    (CLUSTER_PAGE.replace("} 1e+12", "} 0"), "implausible"),
])
def test_a_page_without_plausible_figures_is_refused(page: str, words: str) -> None:
    with pytest.raises(DiskUnavailable, match=words):
        parse_disk(page, read_at=0.0)


def test_the_fuller_of_budget_and_disk_counts() -> None:
    budget_only = Usage(photo_bytes=400 * GB, capacity_bytes=1_000 * GB)
    assert budget_only.fill == pytest.approx(0.4)
    assert budget_only.excess_over(0.8) == 0
    # The disk is fuller than the photos alone say (other data on it).
    disk = Disk(total_bytes=500 * GB, free_bytes=50 * GB, read_at=0.0)
    crowded = Usage(photo_bytes=400 * GB, capacity_bytes=1_000 * GB, disk=disk)
    assert crowded.fill == pytest.approx(0.9)
    assert crowded.excess_over(0.8) == pytest.approx(50 * GB, abs=1)
    # The budget is fuller than the disk.
    roomy = Usage(photo_bytes=950 * GB, capacity_bytes=1_000 * GB,
                  disk=Disk(total_bytes=4_000 * GB, free_bytes=3_000 * GB, read_at=0.0))
    assert roomy.fill == pytest.approx(0.95)
    assert roomy.excess_over(0.8) == pytest.approx(150 * GB, abs=1)
