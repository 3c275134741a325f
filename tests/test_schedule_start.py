"""start_frac / late_step act at step floor(frac * S), checked against exact rational arithmetic
(fractions.Fraction: no float epsilon), through the schedule object and through whole
generations on the tiny model, where the recorder shows the step at which the visual count
first drops. Cases have frac * S not an integer, so a ceil or round in place of the floor
moves the acting step."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from dvlm_exp.decoding.generator import GenPreset, Generator
from dvlm_exp.pruning.base import keep_count
from dvlm_exp.pruning.fastv import FastV
from dvlm_exp.schedules.late_step import LateStep
from dvlm_exp.schedules.start_frac import StartFrac


def naive_start(frac: float, S: int) -> int:
    """floor(frac * S) with frac read as the decimal it is written as (0.3 is 3/10)."""
    return math.floor(Fraction(str(frac)) * S)


# (frac, S): floor vs ceil vs round of frac * S
CASES = [(0.3, 8),     # 2.4: floor 2, ceil 3, round 2
         (0.55, 16),   # 8.8: floor 8, ceil 9, round 9
         (0.75, 10),   # 7.5: floor 7, round 8
         (0.7, 10),    # 7.000000000000001 in floats: must still be 7
         (0.29, 100),  # 28.999999999999996 in floats: must still be 29
         (0.0, 8)]


@pytest.mark.parametrize("frac,S", CASES)
def test_start_frac_step_is_floor(frac, S):
    """Catches ceil/round (or a dropped epsilon) in StartFrac.step."""
    want = naive_start(frac, S)
    sch = StartFrac(frac=frac)
    sch.begin(S)
    assert sch.step == want
    assert [s for s in range(S) if sch.acts_at(s)] == [want]
    assert sch.steps() == [want]


def test_late_step_default_is_floor_of_three_quarters():
    for S in (6, 10, 14):  # 4.5, 7.5, 10.5
        sch = LateStep()
        sch.begin(S)
        assert sch.steps() == [naive_start(0.75, S)]


@pytest.mark.parametrize("frac,S", [(0.3, 8), (0.55, 16)])
def test_start_frac_generation_prunes_at_floor_step(tiny_model, doc_images, frac, S):
    """In a real generation the visual count of the last layer first drops at floor(frac * S),
    and layers < K still see every visual token in that step (the pruning happens inside it)."""
    K, ratio = 2, 0.25
    preset = GenPreset(gen_length=S, block_length=S, steps=S, stop=[], honor_until=False)
    gen = Generator(tiny_model, FastV(ratio=ratio, layer=K, query_set="masked_response"), StartFrac(frac=frac), preset)
    gen.generate("What is the total?", [doc_images[0]])
    rec = gen.recorder.current
    n, T = rec.n_visual, tiny_model.num_layers
    assert rec.n_forwards == S
    per_step_last = [rec.kept_by_step_layer[(s, T - 1)] for s in range(S)]
    first_drop = next(s for s, v in enumerate(per_step_last) if v < n)
    want = naive_start(frac, S)
    assert first_drop == want
    assert per_step_last == [n] * want + [keep_count(n, ratio)] * (S - want)
    assert rec.kept_by_step_layer[(want, K - 1)] == n and rec.kept_by_step_layer[(want, K)] < n
