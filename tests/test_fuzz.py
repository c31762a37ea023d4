"""A fixed-seed slice of the differential fuzz campaign (tests/fuzz_campaign.py; `make fuzz`
runs the full one): 300 random cases, each on the reference, the fused CPU kernels and the
emulated CUDA kernels, against the float64 oracle."""
import pytest
import torch

import fuzz_campaign as fc

SLICE_SEEDS = range(300)


@pytest.mark.cuda_emulation
def test_fuzz_slice_all_backends_match_the_float64_oracle(cuda_emulation):
    cuda_emulation.set_device(16, 2)
    saved = cuda_emulation.random_schedules()
    failures = []
    try:
        for seed in SLICE_SEEDS:
            case = fc.draw_case(seed)
            emulated = torch.Size(case.shape).numel() <= fc.EMULATED_MAX_NUMEL
            cuda_emulation.set_random_schedules([seed + 1])
            problems = fc.run_case(case, emulated)
            if problems:
                failures.append(f"{problems[0]}  [repro: {case.repro()}]")
    finally:
        cuda_emulation.set_random_schedules(saved)
    assert not failures, (f"{len(failures)} of {len(SLICE_SEEDS)} cases:\n"
                          + "\n".join(failures[:20]))


def test_the_oracle_is_not_the_reference():
    # The oracle is written from README's math, not batchrenorm_cuda.reference: a bug in the
    # reference (here, its schedule one step ahead) must show as a mismatch.
    from batchrenorm_cuda import reference

    original = reference.ramp_fraction
    reference.ramp_fraction = lambda step, warmup, ramp: original(step + 1, warmup, ramp)
    try:
        failing = [s for s in range(40) if fc.run_case(fc.draw_case(s), emulated=False)]
    finally:
        reference.ramp_fraction = original
    assert failing, "a broken schedule in the reference went unnoticed"
    assert not [s for s in failing if fc.run_case(fc.draw_case(s), emulated=False)]


def test_cases_cover_every_kind():
    cases = [fc.draw_case(s) for s in SLICE_SEEDS]
    assert {c.dtype for c in cases} == {"float32", "float64", "float16", "bfloat16"}
    assert {len(c.shape) for c in cases} == {2, 3, 4, 5}
    assert {c.layout for c in cases} == set(fc.LAYOUTS)
    assert {c.phase for c in cases} == {"warmup", "ramp", "final"}
    assert {c.mask for c in cases} == {(a, b, d) for a in (0, 1) for b in (0, 1) for d in (0, 1)}
    assert any(c.momentum is None for c in cases) and any(not c.running for c in cases)
    assert any(not c.weight and not c.bias for c in cases) and any(c.eval for c in cases)
    assert any(1 in c.shape for c in cases) and any(13 in c.shape for c in cases)


def test_sync_fuzz_slice_matches_the_float64_oracle(request):
    # SyncBatchRenorm (tests/fuzz_sync.py; `make fuzz` runs 600 cases over world sizes 1-4):
    # one process group of 3 gloo ranks for the whole slice, as starting one costs seconds.
    import fuzz_sync

    from sync_harness import job_backends

    emulated = "cuda_emulated" in job_backends(request)
    seeds = list(range(12))
    problems = fuzz_sync.run_world(seeds, 3, emulated, timeout_s=300)
    cases = [fuzz_sync.draw_case(s, 3) for s in seeds]
    assert any(0 in c.rows for c in cases) and len({c.dtype for c in cases}) == 4
    failures = [f"{found[0]}  [repro: python tests/fuzz_sync.py --repro {s} --world 3]"
                for s, found in problems.items() if found]
    assert not failures, "\n".join(failures)
