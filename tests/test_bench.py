"""The benchmarks' own parts: what they compare must compute the same thing, and their harness must not wait on
what it did not start."""

import ctypes
import subprocess
import sys
import time

import torch

from pipeline.bench import e2e, methods
from pipeline.explain.explainer import TubeExplainer
from pipeline.explain.methods import GradCAM
from pipeline.models import DemoNet3D


def test_one_backward_per_target_gives_the_batched_backwards_tubes():
    """``bench methods`` times top-3 Grad-CAM with one batched backward against one backward per target: both
    must give the same tubes (the second overrides the explainer's gradients, so it follows its layout)."""
    torch.manual_seed(0)
    net = DemoNet3D(num_classes=4).eval()
    shape = (3, 8, 32, 32)
    x = torch.randn(2, *shape)
    top3 = lambda logits: logits.topk(3, dim=1).indices
    batched = TubeExplainer(net, GradCAM(), shape, layer="features")(x, top3)
    separate = methods._OneBackwardPerTarget(net, GradCAM(), shape, layer="features")(x, top3)
    assert batched.tubes.shape == (2, 3, *separate.tubes.shape[2:])
    torch.testing.assert_close(separate.tubes, batched.tubes, rtol=1e-5, atol=1e-6)
    assert torch.equal(separate.targets, batched.targets)


def test_the_timing_harness_waits_only_for_what_its_command_left_behind(tmp_path):
    """``timed_process`` reaps the descendants its command leaves (a forkserver outlives the command), not the
    children the benchmark process had before (an earlier benchmark's forkserver lives until it exits)."""
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        leaves = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(1)'])"
        started = time.monotonic()
        e2e.timed_process([sys.executable, "-c", leaves], "a command leaving a child")
        waited = time.monotonic() - started
        assert 1.0 <= waited < 30  # the orphan's second, not the earlier child's minute
        assert earlier.poll() is None
    finally:
        earlier.kill()
        earlier.wait()
        ctypes.CDLL(None).prctl(36, 0, 0, 0, 0)  # this test process stops adopting orphans (PR_SET_CHILD_SUBREAPER)


def test_bench_ledger_plans_records_and_resumes(tmp_path):
    """The engine at 10,000 shards (quick): every step ends, the kill's lost lines are adopted, nothing is left."""
    from pipeline.bench import ledger

    table = ledger.run(tmp_path, quick=True)
    assert "10,000 shards" in table and "1,001 parts adopted on resume" in table
    assert "| record 10,000 finished shards" in table and not (tmp_path / "ledger-run").exists()


def test_bench_host_table_has_every_part_and_the_parts_add_up(tmp_path):
    import re

    from pipeline.bench import host

    text = host.run(tmp_path, quick=True)
    rows = re.findall(r"^\| \**([A-Za-z' +]+?)\** \|[^|]*\| \**([\d.]+)\** \|$", text, re.M)
    ms = {name: float(value) for name, value in rows}
    assert set(host.PARTS) <= set(ms)
    assert abs(sum(ms[p] for p in host.PARTS) - ms["all"]) <= 0.01 * len(host.PARTS)
    assert abs(ms["all"] - ms["decode"] - ms["collate"] - ms["beyond decode"]) <= 0.02
    own = ms["of which the driving process's own CPU work"]
    assert abs(own - sum(ms[p] for p in host.DRIVER)) <= 0.02
    feed = dict(re.findall(r"^\| (\d+) \| (\d+) \|$", text, re.M))
    assert sorted(map(int, feed)) == list(host.PROCESSES)
    for n, rate in feed.items():  # no CUDA device here: the driving process does all of beyond decode
        bound = min(1000 * int(n) / (ms["decode"] + ms["collate"]), 1000 / ms["beyond decode"])
        assert abs(int(rate) - bound) <= 0.02 * bound + 1
    assert all(ms[p] >= 0 for p in host.PARTS) and ms["decode"] > 0 and ms["explain"] > 0
