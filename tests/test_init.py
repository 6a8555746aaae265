"""Fresh initialisation for training from nothing: deterministic, generator-only, identity-start head."""
from __future__ import annotations

import torch

from harmon.checkpoint import load_state_dict
from harmon.config import tiny
from harmon.models.harmon import Harmon
from harmon.models.init import init_weights


def test_init_is_deterministic_and_local():
    models = [Harmon(tiny()) for _ in range(3)]
    state = torch.random.get_rng_state()
    a, b, c = (init_weights(m, torch.Generator().manual_seed(s)).state_dict() for m, s in zip(models, (1, 1, 2)))
    assert torch.equal(torch.random.get_rng_state(), state)  # only the given generator was used
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["mar.z_proj.weight"], c["mar.z_proj.weight"])
    assert float(a["mar.diffloss.net.final_layer.linear.weight"].abs().sum()) == 0.0
    assert float(a["mar.diffloss.net.res_blocks.0.adaLN_modulation.1.weight"].abs().sum()) == 0.0
    assert torch.allclose(a["mar.encoder_pos_embed_learned"].std(), torch.tensor(0.02), rtol=0.2)


def test_fresh_model_runs_and_its_head_starts_at_zero():
    model = load_state_dict(tiny(), init_weights(Harmon(tiny()), torch.Generator().manual_seed(0)).state_dict())
    x, t, c = torch.randn(5, 16), torch.randint(0, 1000, (5,)), torch.randn(5, 64)
    assert torch.equal(model.mar.diffloss.net(x, t, c), torch.zeros(5, 32))
    images = model.decode(torch.zeros(1, 4, 4, 16))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
