"""bench.py's memory plan against the parameter counts of the presets (no timing here: timings never go in tests)."""
import re

import pytest

import bench


@pytest.mark.parametrize("name,n", [("7B", 6_738_415_616), ("70B", 68_976_648_192)])
def test_memory_plan_parameter_and_optimizer_bytes(name, n):
    lines = bench.memory_plan(name, "ppo", 8, 1, 4096, 8, 80.0)
    gib = 1024 ** 3
    policy = next(line for line in lines if line.startswith("| policy |"))
    params, grads, opt = (float(x) for x in re.findall(r"([\d.]+) GiB", policy)[:3])
    assert params == pytest.approx(round(4 * n / gib, 1))  # fp32 weights
    assert grads == pytest.approx(round(4 * n / gib, 1))  # fp32 gradients
    assert opt == pytest.approx(round(8 * n / gib, 1))  # AdamW's two fp32 moments
    ref = next(line for line in lines if line.startswith("| ref policy |"))  # at the policy's precision (ppo.py)
    assert float(re.findall(r"([\d.]+) GiB", ref)[0]) == pytest.approx(round(4 * n / gib, 1)) and "fp32" in ref
    rm = next(line for line in lines if line.startswith("| rm_safety |"))
    assert float(re.findall(r"([\d.]+) GiB", rm)[0]) == pytest.approx(round(2 * n / gib, 1)) and "bf16" in rm
    fsdp = float(re.findall(r"([\d.]+) GiB", policy)[4])
    assert fsdp == pytest.approx(round(16 * n / 8 / gib, 1))  # FSDP shards the 16 bytes/param over 8 GPUs


def test_checkpointing_shrinks_activations():
    import model as M
    a = M.preset("7B")
    assert bench.activation_bytes(a, 1, 4096, True) < bench.activation_bytes(a, 1, 4096, False) / 3
