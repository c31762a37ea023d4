"""The CUDA emulator's own checks, each seen to fire on a deliberately broken kernel
(csrc/cuda/emulation/selftest_kernels.cu), and the real kernels on fake devices of other sizes."""
import pytest
import torch

import fused_cases

pytestmark = pytest.mark.cuda_emulation


@pytest.fixture
def emu(cuda_emulation):
    cuda_emulation.set_device(16, 2)
    yield cuda_emulation
    cuda_emulation.set_schedule(0)


def run(emu, name, seed=0):
    out = torch.empty(128)
    emu.set_schedule(seed)
    try:
        return emu.run_selftest(name, out), out
    finally:
        emu.set_schedule(0)


@pytest.mark.parametrize("name,message", [
    ("exit_before_barrier", "thread (5,0,0): exits while 5 thread(s) wait at __syncthreads"),
    ("divergent_barriers", "divergent barriers"),
    ("shuffle_with_exited_lane", "thread (3,0,0): exits while its warp waits for it"),
    ("shuffle_mask_mismatch", "the mask names lane 15, which has exited"),
    ("grid_sync_not_cooperative", "not launched with cudaLaunchCooperativeKernel"),
    ("cooperative_too_large", "cudaErrorCooperativeLaunchTooLarge"),
])
def test_each_check_reports_the_kernel_cta_thread_and_site(emu, name, message):
    fault, _ = run(emu, name)
    assert message in fault, fault
    if name != "cooperative_too_large":
        assert "CTA (" in fault and "selftest_kernels.cu:" in fault, fault


def test_a_correct_cooperative_kernel_passes_under_every_schedule(emu):
    for seed in (0, 1, 2, 3):
        fault, out = run(emu, "grid_sync", seed)
        assert fault == ""
        assert torch.equal(out[:64], torch.full((64,), 2.0))
        fault, out = run(emu, "cross_cta", seed)
        assert fault == "" and out[2].item() == 2.0


def test_shared_memory_is_poisoned_so_a_read_before_write_shows(emu):
    fault, out = run(emu, "read_before_write")
    assert fault == ""
    assert torch.isnan(out[:64]).all()


def test_random_schedules_expose_a_shared_memory_race(emu):
    outputs = [run(emu, "shared_race", seed)[1][:64].clone() for seed in (0, 1, 2, 3)]
    assert any(not torch.equal(outputs[0].view(torch.int32), o.view(torch.int32))
               for o in outputs[1:]), "the missing barrier went unnoticed"


@pytest.mark.parametrize("sms,ctas_per_sm", [(2, 1), (66, 2)])
@pytest.mark.parametrize("shape,kind", [((64, 12), "contiguous"), ((3, 5, 14, 14), "contiguous"),
                                        ((4, 6, 8, 8), "contiguous"),
                                        ((3, 16, 7, 7), "channels_last"),
                                        ((16, 3, 32, 32), "contiguous"),
                                        ((16, 3, 32, 32), "channels_last")])
def test_kernels_on_emulated_devices_of_other_sizes(cuda_emulation, sms, ctas_per_sm, shape, kind):
    # 66 SMs: up to 132 CTAs per channel, more than 16 partials per shuffle tree; 2 SMs x 1: many
    # units per CTA.
    from batchrenorm_cuda._testing import fused_ops_namespace

    cuda_emulation.set_device(sms, ctas_per_sm)
    try:
        with fused_ops_namespace("batchrenorm_emulated_cuda"):
            fused_cases.compare_steps(shape, kind, torch.float32, "cpu", steps=2)
    finally:
        cuda_emulation.set_device(16, 2)
