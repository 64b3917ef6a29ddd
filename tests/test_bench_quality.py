"""bench/quality.py's round-robin training with quality probes, on fake trainers whose steps take
known times: every system gets its budget, and a probe is taken once per probe mark passed, also
when one step passes several marks."""
import sys
import time

from utils import ROOT

sys.path.append(str(ROOT))  # the bench package, found last: an installed moediffuseq still wins
from bench.quality import slug, train_round_robin  # noqa: E402


class FakeTrainer:
    def __init__(self, step_seconds, first_step_seconds=None):
        self.step_seconds, self.first_step_seconds, self.steps = step_seconds, first_step_seconds, 0

    def train_step(self):
        time.sleep(self.first_step_seconds if self.steps == 0 and self.first_step_seconds else self.step_seconds)
        self.steps += 1
        return {"loss": 1.0 / self.steps}


def test_every_system_trains_its_budget_and_is_probed_once_per_mark():
    # a slow step passes several marks; so does a slow first step (a warm-up) followed by fast ones
    trainers = {"fast": FakeTrainer(0.01), "slow": FakeTrainer(0.25), "warm-up": FakeTrainer(0.01, 0.35)}
    curves, probes = train_round_robin(trainers, seconds=0.6, slice_seconds=0.1,
                                       probe=lambda trainer: {"steps": trainer.steps}, probe_seconds=0.1)
    for name, trainer in trainers.items():
        assert curves[name][-1][0] >= 0.6 and len(curves[name]) == trainer.steps
        assert [loss for _, loss in curves[name]] == [1.0 / (i + 1) for i in range(trainer.steps)]
        marks = [int(t // 0.1) for t, _ in probes[name]]
        assert marks == sorted(set(marks)) and marks, marks  # one probe per mark, in order
        assert all(m["steps"] >= 1 for _, m in probes[name])
    assert len(probes["slow"]) <= trainers["slow"].steps  # at most one probe per slow step


def test_without_a_probe_there_are_no_probes():
    curves, probes = train_round_robin({"a": FakeTrainer(0.005)}, seconds=0.05, slice_seconds=0.02)
    assert probes == {"a": []} and curves["a"][-1][0] >= 0.05


def test_run_directories_are_distinct_per_system():
    from bench.quality import SYSTEMS

    assert len({slug(name) for name in SYSTEMS}) == len(SYSTEMS)
    assert slug("moe-diffuseq +self-cond") == "moe-diffuseq-self-cond"


def test_tasks_name_the_span_and_the_lead_baseline_cuts_words():
    from bench.quality import lead, parse_task

    assert parse_task("pycode:512:48") == ("pycode", 512, 48)
    assert parse_task("aclsum:2048") == ("aclsum", 2048, 256)
    assert lead(["a b c d", "e"], 2) == ["a b", "e"]


def test_the_cpu_clock_counts_only_what_the_process_computes():
    from bench.quality import CLOCKS

    trainers = {"sleeper": FakeTrainer(0.05)}  # sleeps: wall time passes, CPU time hardly
    curves, _ = train_round_robin(trainers, seconds=0.0005, slice_seconds=0.0002, clock=CLOCKS["cpu"])
    assert trainers["sleeper"].steps > 2 and curves["sleeper"][-1][0] < 0.05 * trainers["sleeper"].steps
