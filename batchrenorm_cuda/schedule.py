"""schedule_for(): the r_max / d_max schedule for a run of a given length.

The modules' defaults (warm-up 5,000 steps, r_max reached at 40,000, d_max at 25,000) are the
paper's, for runs of 100k steps and more. A shorter run that keeps them is plain BatchNorm for
its first 5,000 steps and never reaches the final bounds. schedule_for scales the paper's
schedule to the run: the warm-up ends at 5 %, r_max is reached at 40 % and d_max at 25 % of
the steps. The warm-up also lasts at least `warmup_windows` averaging windows of the moving
averages (1 / momentum updates each), so that r and d are not switched on against running
statistics that still hold their initial (0, 1). The paper's warm-up is 50 windows (5,000
steps at momentum 0.01). A 1,200-step run scaled to 5 % has 0.6 windows (60 steps), which cost
the accuracy experiment 2.1 points on its i.i.d. control (benchmarks/NOTES.md, issue 20).
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional

# The paper's schedule as fractions of a run (Ioffe 2017: 5k / 40k / 25k steps of 100k+).
WARMUP_FRACTION = 0.05
R_MAX_REACHED_FRACTION = 0.40
D_MAX_REACHED_FRACTION = 0.25


def schedule_for(total_steps: int, momentum: Optional[float] = 0.01,
                 warmup_windows: float = 3) -> Dict[str, int]:
    """warmup_steps, r_max_ramp_steps and d_max_ramp_steps for a run of total_steps training
    steps, as keyword arguments of BatchRenorm1d/2d/3d, SyncBatchRenorm and convert_batchnorm:

        layer = brn.BatchRenorm2d(64, **brn.schedule_for(20_000))

    The paper's fractions (warm-up 5 %, r_max reached at 40 %, d_max at 25 %), with the
    warm-up stretched to at least warmup_windows / momentum steps; the ramps then keep their
    lengths and end later. Pass the layer's momentum (None, a cumulative average, has no
    initial bias to wait for). warmup_windows=0 gives the paper's fractions alone.
    A step counts one training forward of the layer.
    """
    for name, value in (("total_steps", total_steps), ("warmup_windows", warmup_windows)):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"schedule_for: {name} must be a non-negative number, got "
                             f"{value!r}")
    if momentum is not None and (not isinstance(momentum, numbers.Real)
                                 or isinstance(momentum, bool) or not 0 < momentum <= 1):
        raise ValueError(f"schedule_for: momentum must be in (0, 1] or None, got {momentum!r}")
    warmup = int(round(WARMUP_FRACTION * total_steps))
    r_ramp = int(round(R_MAX_REACHED_FRACTION * total_steps)) - warmup
    d_ramp = int(round(D_MAX_REACHED_FRACTION * total_steps)) - warmup
    if warmup_windows and momentum:
        warmup = max(warmup, math.ceil(warmup_windows / momentum))
    return dict(warmup_steps=warmup, r_max_ramp_steps=r_ramp, d_max_ramp_steps=d_ramp)
