"""bench/: runs that take turns step by step (`benchlib.measured_in_turns`, `bench/train_lora.py --interleave`).

Two stand-in training scripts, a light step and a heavy one, run under bench/measure.py with a baton: each step of
one is taken while the other waits, in rounds whose order rotates, and each run's intervals time its own step alone.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A training script in miniature: an optimizer stepping `steps` times, `work` matrix products per step, and a line
# "name step" appended to a shared log at each step (one write each, O_APPEND: lines from both runs never mix).
SCRIPT = """
import os, sys, torch
name, steps, work, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
weight = torch.nn.Parameter(torch.ones(64, 64))
optimizer = torch.optim.SGD([weight], lr=1e-6)
for step in range(1, steps + 1):
    x = torch.ones(64, 64)
    for _ in range(work):
        x = torch.tanh(x @ weight)
    x.sum().backward()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{name} {step}\\n".encode())
    os.close(fd)
    optimizer.step()
    optimizer.zero_grad()
"""


def test_runs_in_turns_step_one_at_a_time_and_time_their_own_steps(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from benchlib import Run, measured_in_turns

    script, log, steps = tmp_path / "train.py", tmp_path / "steps.log", 8
    script.write_text(SCRIPT)
    runs = {
        name: Run(str(script), [name, str(steps), str(work), str(log)], tmp_path / name / "measure.json", tmp_path)
        for name, work in (("light", 1), ("heavy", 400))
    }
    measured = measured_in_turns(runs, steps)

    lines = log.read_text().split()
    order = [f"{name} {step}" for name, step in zip(lines[::2], lines[1::2])]
    assert sorted(order[:2]) == ["heavy 1", "light 1"]  # both set up at once, then wait after their first step
    rounds = [["light", "heavy"] if k % 2 == 0 else ["heavy", "light"] for k in range(steps - 1)]
    assert order[2:] == [f"{name} {k + 2}" for k, names in enumerate(rounds) for name in names]
    light, heavy = measured["light"], measured["heavy"]
    assert light["in_turns"] and light["steps"] == heavy["steps"] == steps
    # the light run's interval starts when its turn comes back, not at its last step: the heavy step is not in it
    assert statistics.median(light["step_intervals"]) < statistics.median(heavy["step_intervals"]) / 4
