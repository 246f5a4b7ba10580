import pytest
import torch

from qcorrect.quant import ActQuantizer, QuantContext, QuantizationError, fake_quantize, sigma_scope


def test_fake_quantize_grid_and_error():
    x = torch.linspace(-1, 1, 1001)
    for bits in (4, 8, 12):
        for sym in (True, False):
            y = fake_quantize(x, x.min(), x.max(), bits, sym)
            levels = 2**bits - (2 if sym else 1)
            assert len(torch.unique(y)) <= levels + 1
            assert (y - x).abs().max() <= (2.0 / levels) / 2 + 1e-6


def test_fake_quantize_tensor_bits_equal_int_bits():
    x = torch.randn(100)
    lo, hi = x.min(), x.max()
    for bits in (4, 10, 16):
        for sym in (True, False):
            assert torch.equal(fake_quantize(x, lo, hi, bits, sym), fake_quantize(x, lo, hi, torch.tensor(float(bits)), sym))


def test_fake_quantize_keeps_dtype():
    x = torch.randn(10).half()
    assert fake_quantize(x, x.min(), x.max(), 8, False).dtype == torch.float16


def test_dynamic_and_none():
    x = torch.randn(4, 16)
    assert torch.equal(ActQuantizer(None, "none")(x), x)
    y = ActQuantizer("a4_asym", "dynamic")(x)
    assert not torch.equal(y, x) and all(len(torch.unique(row)) <= 16 for row in y)


def test_dynamic_range_is_per_sample_so_batching_does_not_change_results():
    q = ActQuantizer("a8_asym", "dynamic")
    x = torch.randn(3, 5, 7) * torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1)
    batched = q(x)
    for i in range(3):
        assert torch.equal(batched[i : i + 1], q(x[i : i + 1]))


def test_static_ranges_picked_at_nearest_sigma():
    ctx = QuantContext()
    q = ActQuantizer("a8", "static", ctx, "l")
    q.set_static_ranges(torch.tensor([10.0, 1.0, 0.1]), torch.tensor([-10.0, -1.0, -0.1]), torch.tensor([10.0, 1.0, 0.1]))
    x = torch.linspace(-20, 20, 401)
    for sigma, amax in [(0.1, 0.1), (0.12, 0.1), (0.9, 1.0), (3.1, 1.0), (3.2, 10.0), (50.0, 10.0)]:
        ctx.sigma = torch.tensor([sigma, sigma])
        y = q(x)
        assert y.abs().max() == pytest.approx(amax, rel=1e-6), sigma  # nearest in log σ (1↔10 split at 3.16)
    ctx.sigma = None  # outside a σ scope: the union of the ranges
    assert q(x).abs().max() == pytest.approx(10.0)


def test_static_without_ranges_fails_clearly():
    q = ActQuantizer("a8", "static", QuantContext(), "down.1")
    with pytest.raises(QuantizationError, match="'down.1'.*no calibrated ranges"):
        q(torch.randn(3))


def test_bit_schedule_switches_by_sigma():
    ctx = QuantContext()
    q = ActQuantizer("a8", "dynamic", ctx, "l")
    q.set_schedule([(0.0, 1.0, 16), (5.0, 20.0, 4)])
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0))
    def n_levels(sigma):
        ctx.sigma = None if sigma is None else torch.tensor([sigma])
        return len(torch.unique(q(x)))
    assert n_levels(10.0) <= 15          # 4-bit inside (5, 20)
    assert 15 < n_levels(2.0) <= 255     # default 8-bit between the ranges
    assert n_levels(0.5) > 1000          # 16-bit near x0
    assert 15 < n_levels(None) <= 255    # no σ: default bits
    q.set_schedule([])
    assert n_levels(0.5) <= 255


@pytest.mark.parametrize("bad", [[(0, 1, 3)], [(0, 1, 17)], [(2.0, 1.0, 8)], [(0, 1)], ["x"]])
def test_bad_schedules(bad):
    with pytest.raises(QuantizationError):
        ActQuantizer("a8", "dynamic").set_schedule(bad)


def test_sigma_scope_restores_and_is_per_model():
    from qcorrect.quant.context import attach_context
    a, b = torch.nn.Module(), torch.nn.Module()
    ca, cb = attach_context(a), attach_context(b)
    with sigma_scope(a, 2.0):
        assert float(ca.sigma) == 2.0 and cb.sigma is None
        with sigma_scope(a, torch.tensor([0.5])):
            assert float(ca.sigma) == 0.5
        assert float(ca.sigma) == 2.0
    assert ca.sigma is None


def test_bad_modes_and_types():
    with pytest.raises(QuantizationError, match="unknown activation mode"):
        ActQuantizer("a8", "sometimes")
    with pytest.raises(QuantizationError, match="not an activation type"):
        ActQuantizer("int8", "dynamic")
    with pytest.raises(QuantizationError, match="needs an activation type"):
        ActQuantizer(None, "dynamic")


# ranges shared by the passes of one latent (CFG's cond and uncond in one batch) -----------------

def _cfg_pair(n=3, seed=0):
    """Two passes of ``n`` latents, stacked pass by pass: activations that agree to well below an
    8-bit step almost everywhere, and ranges that differ (one element of the cond pass stands out)."""
    g = torch.Generator().manual_seed(seed)
    uncond = torch.randn(n, 4, 6, 6, generator=g)
    cond = uncond + 1e-4 * torch.randn(n, 4, 6, 6, generator=g)
    cond[:, 0, 0, 0] = cond.flatten(1).amax(1) + 0.5 + torch.rand(n, generator=g)
    return uncond, cond


def test_per_latent_ranges_are_the_union_over_the_passes_of_each_latent():
    ctx = QuantContext()
    q = ActQuantizer("a8_asym", "dynamic", ctx, "l", ranges="per_latent")
    uncond, cond = _cfg_pair()
    x = torch.cat([uncond, cond])
    with sigma_scope_latents(q, ctx, 3):
        y = q(x)
    for i in range(3):
        lo = torch.minimum(uncond[i].min(), cond[i].min())
        hi = torch.maximum(uncond[i].max(), cond[i].max())
        assert torch.equal(y[i], fake_quantize(uncond[i], lo, hi, 8, False))
        assert torch.equal(y[3 + i], fake_quantize(cond[i], lo, hi, 8, False))
    # the same layer outside such a call, or asked for per-sample ranges, quantizes each sample alone
    alone = ActQuantizer("a8_asym", "dynamic", ctx, "l", ranges="per_sample")
    with sigma_scope_latents(q, ctx, 3):
        assert torch.equal(alone(x), torch.cat([alone(x[i:i + 1]) for i in range(6)]))
    assert torch.equal(q(x), alone(x))  # context says nothing about the latents


def sigma_scope_latents(q, ctx, latents):
    """The σ scope of a module that owns ``ctx`` (what SigmaScopedDenoiser does for a quantized UNet)."""
    from qcorrect.quant.context import CONTEXT_ATTR
    holder = torch.nn.Module()
    holder.__dict__[CONTEXT_ATTR] = ctx
    return sigma_scope(holder, None, latents=latents)


def test_per_latent_ranges_lower_the_error_that_guidance_amplifies():
    ctx = QuantContext()
    uncond, cond = _cfg_pair(n=8, seed=1)
    x, s = torch.cat([uncond, cond]), 3.0
    exact = uncond + s * (cond - uncond)
    errors = {}
    for ranges in ("per_sample", "per_latent"):
        q = ActQuantizer("a8_asym", "dynamic", ctx, "l", ranges=ranges)
        with sigma_scope_latents(q, ctx, 8):
            u, c = q(x).chunk(2)
        errors[ranges] = (u + s * (c - u) - exact).pow(2).mean()
    # one grid for both passes: their rounding errors largely agree and pass through guidance once
    assert errors["per_latent"] < 0.5 * errors["per_sample"]


def test_per_latent_ranges_leave_single_passes_and_other_batches_alone():
    ctx = QuantContext()
    q = ActQuantizer("a8_asym", "dynamic", ctx, "l", ranges="per_latent")
    ref = ActQuantizer("a8_asym", "dynamic", ctx, "l", ranges="per_sample")
    x = torch.randn(6, 5) * torch.arange(1, 7).reshape(6, 1)
    # CFG 1 (one pass per latent), a batch the latents do not divide, more than MAX_PASSES passes
    for latents in (6, 4, 5):
        with sigma_scope_latents(q, ctx, latents):
            assert torch.equal(q(x), ref(x)), latents
    from qcorrect.quant.activations import MAX_PASSES
    many = torch.randn(2 * (MAX_PASSES + 1), 3)
    with sigma_scope_latents(q, ctx, 2):
        assert torch.equal(q(many), ref(many))
    with sigma_scope_latents(q, ctx, 3):
        assert not torch.equal(q(x), ref(x))  # two passes of three latents: shared


def test_bad_ranges_and_latents_refused():
    with pytest.raises(QuantizationError, match="unknown activation ranges"):
        ActQuantizer("a8_asym", "dynamic", QuantContext(), "l", ranges="per_token")
    with pytest.raises(ValueError, match="latents"):
        with sigma_scope_latents(None, QuantContext(), 0):
            pass


def test_sigma_scoped_denoiser_publishes_the_latents_and_restores_them():
    from qcorrect.quant import SigmaScopedDenoiser
    from qcorrect.quant.context import attach_context
    module = torch.nn.Module()
    ctx = attach_context(module)
    seen = []

    def denoiser(x, sigma, **extra):
        seen.append((ctx.latents, float(ctx.sigma.reshape(-1)[0])))
        return x

    SigmaScopedDenoiser(denoiser, module)(torch.zeros(5, 2), torch.tensor([2.0]))
    assert seen == [(5, 2.0)] and ctx.latents is None and ctx.sigma is None


def test_per_sample_range_is_the_exact_min_and_max_of_each_sample():
    # the CPU path takes amin/amax (torch's CPU aminmax along a dim is several times slower); the
    # values must be the exact extremes, the same as aminmax's
    from qcorrect.quant.activations import _per_sample_range

    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    x[2, 1, 0, 0] = 40.0
    lo, hi = _per_sample_range(x)
    ref_lo, ref_hi = torch.aminmax(x.reshape(5, -1), dim=1)
    assert lo.shape == hi.shape == (5, 1, 1, 1)
    assert torch.equal(lo.reshape(-1), ref_lo) and torch.equal(hi.reshape(-1), ref_hi)
    assert float(hi[2]) == 40.0


def test_fake_quantize_gives_the_values_of_the_textbook_formula():
    # fake_quantize works in place and folds the zero point into its bounds; it must give exactly the values the
    # out-of-place formula (divide, round, add the zero point, clamp, subtract it, multiply) gives
    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float16):
        x = (torch.randn(3, 64, generator=g) * 3).to(dtype)
        lo, hi = x.float().amin(1, keepdim=True) * 0.8, x.float().amax(1, keepdim=True) * 0.7
        for bits in (8, 4, torch.tensor(6.0)):
            levels = 2.0 ** float(bits) - 1
            scale = ((hi.clamp(min=0) - lo.clamp(max=0)) / levels).clamp_min(1e-8)
            zero = torch.round(-lo.clamp(max=0) / scale)
            want = ((torch.clamp(torch.round(x.float() / scale) + zero, 0, levels) - zero) * scale).to(dtype)
            assert torch.equal(fake_quantize(x, lo, hi, bits, False), want)
            qmax = 2.0 ** (float(bits) - 1) - 1
            s = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(1e-8)
            want = (torch.clamp(torch.round(x.float() / s), -qmax, qmax) * s).to(dtype)
            assert torch.equal(fake_quantize(x, lo, hi, bits, True), want)
