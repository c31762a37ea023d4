"""The CrossQ pattern (Bhatt et al., ICLR 2024), the main use of Batch Renorm today: BatchRenorm1d
after every hidden layer of an MLP critic; the critic sees the joint (s, a) / (s', a') batch in
train mode, and the actor's loss backpropagates through the critic in eval mode. Warm-up is a
hard switch (warmup_steps=W, both ramps 0), eps 1e-3, momentum 0.01.

And the schedule's property: at every step r and d lie within that step's bounds, which never
exceed the final ones; r is positive (an implementation whose warm-up factor grows without
bound flips r's sign past twice the warm-up)."""
import copy

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import batchrenorm_cuda as brn
from batchrenorm_cuda import reference

S, A, HIDDEN, BATCH = 5, 2, 32, 64
CROSSQ = dict(eps=1e-3, momentum=0.01, warmup_steps=3, r_max_ramp_steps=0, d_max_ramp_steps=0)


def _critic(backend):
    return nn.Sequential(
        nn.Linear(S + A, HIDDEN), brn.BatchRenorm1d(HIDDEN, backend=backend, **CROSSQ), nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN), brn.BatchRenorm1d(HIDDEN, backend=backend, **CROSSQ), nn.ReLU(),
        nn.Linear(HIDDEN, 1)).double()


def _crossq_steps(critic, actor, steps=6, seed=0):
    """CrossQ's update, recording what it computed. No target network: the joint batch gives
    Q(s', a') with the same statistics as Q(s, a)."""
    g = torch.Generator().manual_seed(seed)
    c_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    a_opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    record = []
    for step in range(steps):
        s, s2 = (torch.randn(BATCH, S, generator=g, dtype=torch.float64) * 2 + step
                 for _ in range(2))
        a = torch.rand(BATCH, A, generator=g, dtype=torch.float64) * 2 - 1
        reward = torch.randn(BATCH, 1, generator=g, dtype=torch.float64)
        with torch.no_grad():
            a2 = actor(s2)
        # Critic: one train-mode call on the joint batch.
        critic.train()
        q, q2 = critic(torch.cat([torch.cat([s, a], 1), torch.cat([s2, a2], 1)])).chunk(2)
        critic_loss = (q - (reward + 0.99 * q2.detach())).pow(2).mean()
        c_opt.zero_grad()
        critic_loss.backward()
        c_opt.step()
        # Actor: through the critic in eval mode, which must not touch its buffers.
        critic.eval()
        buffers = [b.clone() for b in critic.buffers()]
        s_in = s.clone().requires_grad_()
        actor_loss = -critic(torch.cat([s_in, actor(s_in)], 1)).mean()
        a_opt.zero_grad()
        critic.zero_grad()
        actor_loss.backward()
        a_opt.step()
        for before, after in zip(buffers, critic.buffers()):
            assert torch.equal(before, after), "eval mode changed a critic buffer"
        assert s_in.grad is not None and s_in.grad.abs().sum() > 0
        assert all(p.grad is not None for p in actor.parameters())
        record.append((critic_loss.detach(), actor_loss.detach(), s_in.grad,
                       [p.grad.clone() for p in actor.parameters()],
                       [b.clone() for b in critic.buffers()], critic[1].clip_bounds()))
    return record


def test_crossq_pattern_matches_reference(backend):
    torch.manual_seed(0)
    critic = _critic(backend)
    actor = nn.Sequential(nn.Linear(S, 16), nn.Tanh(), nn.Linear(16, A), nn.Tanh()).double()
    ref_critic, ref_actor = copy.deepcopy(critic), copy.deepcopy(actor)
    for m in ref_critic.modules():
        if isinstance(m, brn.BatchRenorm1d):
            m.backend = "reference"
    got = _crossq_steps(critic, actor)
    expected = _crossq_steps(ref_critic, ref_actor)
    tol = dict(atol=1e-8, rtol=1e-7)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert_close(g[:3], e[:3], **tol, msg=f"losses or input grad at step {step}")
        assert_close(g[3], e[3], **tol, msg=f"actor grads at step {step}")
        assert_close(g[4], e[4], **tol, msg=f"critic buffers at step {step}")
        assert g[5] == e[5]
    # The hard switch: plain BatchNorm for 3 steps, then the final bounds at once.
    assert [r[5] for r in got] == [(1.0, 0.0)] * 2 + [(3.0, 5.0)] * 4
    assert int(critic[1].num_batches_tracked) == 6


def test_joint_batch_normalises_with_the_joint_statistics(backend):
    layer = brn.BatchRenorm1d(4, backend=backend, **CROSSQ).double()
    x = torch.randn(2 * BATCH, 4, dtype=torch.float64) * 3 + 1
    y = layer(x)
    xd = x.double()
    expected = (xd - xd.mean(0)) / (xd.var(0, correction=0) + 1e-3).sqrt()  # warm-up: BatchNorm
    assert_close(y, expected)
    assert_close(layer.running_mean, 0.01 * xd.mean(0))


# ---------------------------------------------------------------------------------------------
# The schedule's bounds, r and d at every step.

def _paper_bounds(step, r_max, d_max, warmup, r_ramp, d_ramp):
    """The schedule written independently of reference.clip_bounds: BatchNorm during warm-up,
    then linear ramps reaching the final bounds, held from then on."""
    def fraction(ramp):
        if step < warmup:
            return 0.0
        return 1.0 if ramp == 0 else min((step - warmup) / ramp, 1.0)
    return 1.0 + (r_max - 1.0) * fraction(r_ramp), d_max * fraction(d_ramp)


def _r_and_d(backend, x, rm, rv, step, r_max, d_max, warmup, r_ramp, d_ramp):
    """r and d of one training step at `step`: from the fused op's outputs, or (reference) from
    the reference's own formula for them."""
    counter = torch.tensor(step)
    if backend == "fused":
        from batchrenorm_cuda import _ops
        _, _, _, r, d = _ops.OPS.forward_train(x, None, None, rm.clone(), rv.clone(), counter,
                                               0.01, 1e-3, r_max, d_max, warmup, r_ramp, d_ramp)
        return r.double(), d.double()
    rmax, dmax = reference.clip_bounds(counter, r_max, d_max, warmup, r_ramp, d_ramp)
    sigma_b = torch.sqrt(x.var(0, correction=0) + 1e-3)
    sigma = torch.sqrt(rv + 1e-3)
    return (torch.clamp(sigma_b / sigma, 1 / rmax, rmax),
            torch.clamp((x.mean(0) - rm) / sigma, -dmax, dmax))


@settings(max_examples=25, deadline=None)
@example(warmup=0, r_ramp=0, d_ramp=3, r_max=1.0, d_max=1.401298464324817e-45, scale=0.0,
         shift=0.0, seed=0)
@given(warmup=st.integers(0, 12), r_ramp=st.integers(0, 12), d_ramp=st.integers(0, 12),
       r_max=st.floats(1.0, 10.0), d_max=st.floats(0.0, 10.0),
       scale=st.floats(-3.0, 3.0), shift=st.floats(-3.0, 3.0), seed=st.integers(0, 2**16))
def test_r_and_d_stay_within_the_schedule_at_every_step(warmup, r_ramp, d_ramp, r_max, d_max,
                                                         scale, shift, seed):
    g = torch.Generator().manual_seed(seed)
    # Batches whose statistics are far from the running ones (10^±3 in std, mean up to 10^3
    # away), so that the bounds, not the data, decide r and d.
    x = torch.randn(16, 6, generator=g) * 10 ** scale + 10 ** abs(shift) * (1 if shift > 0 else -1)
    rm = torch.randn(6, generator=g) * 10
    rv = torch.rand(6, generator=g) * 10 ** (-scale) + 1e-3
    backends = ["reference"] + (["fused"] if brn.extension_available("cpu") else [])
    last = (1.0, 0.0)
    for step in range(3 * (warmup + max(r_ramp, d_ramp)) + 3):
        bounds = _paper_bounds(step, r_max, d_max, warmup, r_ramp, d_ramp)
        assert 1.0 <= bounds[0] <= r_max and 0.0 <= bounds[1] <= d_max
        assert bounds[0] >= last[0] and bounds[1] >= last[1]  # the bounds only relax
        last = bounds
        ref_bounds = reference.clip_bounds(torch.tensor(step), r_max, d_max, warmup, r_ramp, d_ramp)
        assert_close(torch.stack(ref_bounds).double(),
                     torch.tensor(bounds, dtype=torch.float64))
        for backend in backends:
            r, d = _r_and_d(backend, x, rm, rv, step, r_max, d_max, warmup, r_ramp, d_ramp)
            # float32 rounding of the bounds themselves: one ulp.
            slack = 1 + 2 ** -22
            assert (r > 0).all(), f"{backend}: r flipped sign at step {step}"
            assert (r <= bounds[0] * slack).all() and (r >= 1 / bounds[0] / slack).all(), \
                f"{backend}: r outside [1/{bounds[0]}, {bounds[0]}] at step {step}: {r}"
            # A subnormal d_max (hypothesis finds 1.4e-45) has no relative precision left in
            # float32: the bound itself rounds by up to one subnormal step, 2^-149.
            assert (d.abs() <= bounds[1] * slack + 2.0 ** -149).all(), \
                f"{backend}: d outside +-{bounds[1]} at step {step}: {d}"
