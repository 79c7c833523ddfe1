"""The benchmark harness runs end to end at tiny sizes: it checks the harness, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from deploy.processes import REPO_ROOT


@pytest.mark.timeout(600)
def test_quick_benchmark_writes_results_and_chart(kafka_bootstrap, tmp_path) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap}
    subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)], cwd=REPO_ROOT, env=env,
                   check=True, timeout=560)
    [run_dir] = tmp_path.iterdir()
    assert (run_dir / "chart.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["machine"]["cores"] == os.cpu_count()
    scenarios = results["scenarios"]
    submit = scenarios["submit"]
    for measured in (submit["ferry"], submit["ceiling_bare_aiohttp"], submit["ceiling_raw_aiokafka"]):
        assert measured["ok"] > 0 and measured["statuses"] == {"202": measured["requests"]}
    assert submit["ratio_to_bare"] > 0 and submit["ferry"]["api"]["rss_mb_max"] > 0
    e2e = scenarios["e2e"]["rate_50"]
    assert e2e["statuses"] == {"200": e2e["requests"]} and e2e["requests"] == 100  # 50/s for 2 s, all completed
    assert scenarios["inflight"]["rate_50"]["peak_in_flight"] > 0  # 2 s calls overlap
    assert scenarios["e2e"]["warmup"]["requests"] == 50  # 50/s for 1 s before the measured load
    backlog = scenarios["backlog"]["backlog"]
    assert backlog["jobs"] == 300 and backlog["worker_rss_series"]
    assert scenarios["backlog"]["poll"]["statuses"] == {"200": scenarios["backlog"]["poll"]["requests"]}
