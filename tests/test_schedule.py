"""brn.schedule_for: the paper's schedule scaled to a run, the warm-up >= 3 averaging windows."""
import pytest
import torch

import batchrenorm_cuda as brn


def test_fractions_of_the_run_and_the_averaging_windows():
    # The paper's: warm-up 5 %, r_max at 40 %, d_max at 25 % (5k / 40k / 25k of 100k).
    assert brn.schedule_for(100_000) == dict(warmup_steps=5000, r_max_ramp_steps=35000,
                                             d_max_ramp_steps=20000)
    # 1,200 steps: 5 % is 60, shorter than 3 windows of momentum 0.01 (300); the ramps keep
    # their lengths (r_max then reached at 720, d_max at 540).
    assert brn.schedule_for(1200) == dict(warmup_steps=300, r_max_ramp_steps=420,
                                          d_max_ramp_steps=240)
    assert brn.schedule_for(1200, warmup_windows=0)["warmup_steps"] == 60
    assert brn.schedule_for(1200, momentum=0.1)["warmup_steps"] == 60
    assert brn.schedule_for(1200, momentum=None)["warmup_steps"] == 60  # no initial bias


def test_is_the_modules_schedule():
    layer = brn.BatchRenorm1d(4, **brn.schedule_for(1200))
    layer.num_batches_tracked.fill_(300)
    assert layer.clip_bounds() == (1.0, 0.0)  # the last warm-up step
    layer.num_batches_tracked.fill_(300 + 420)
    assert layer.clip_bounds() == (3.0, 5.0)
    layer(torch.randn(8, 4))


@pytest.mark.parametrize("kwargs,name", [(dict(total_steps=-1), "total_steps"),
                                         (dict(total_steps="100"), "total_steps"),
                                         (dict(total_steps=100, momentum=0.0), "momentum"),
                                         (dict(total_steps=100, warmup_windows=-2),
                                          "warmup_windows")])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=f"schedule_for: {name} must be"):
        brn.schedule_for(**kwargs)
