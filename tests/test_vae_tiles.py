"""The VAE: channels-last inside, and tiled decoding (bounded memory for large images, as faithful as decoding
whole)."""
import numpy as np
import pytest
import torch
from PIL import Image

from harmon.checkpoint import load_model
from harmon.cli import main
from harmon.errors import InputError
from harmon.hub import default_model_folder
from harmon.models.vae import _tile_starts
from harmon.processing import image_to_tensor
from harmon.settings import GenerationSettings
from harmon.shapes import world

from cli_helpers import assert_user_error


@pytest.mark.parametrize("length,tile,overlap", [(16, 8, 2), (17, 8, 2), (9, 8, 0), (40, 32, 8), (8, 8, 2), (5, 8, 2)])
def test_tile_starts_cover_the_grid_with_the_overlap(length, tile, overlap):
    starts = _tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(length, starts[-1] + tile) == length
    covered = np.zeros(length, dtype=int)
    for s in starts:
        covered[s:s + tile] += 1
    assert covered.min() >= 1
    for a, b in zip(starts, starts[1:]):
        assert a < b and a + tile - b >= overlap  # neighbours share at least `overlap` cells


@pytest.fixture(scope="module")
def shapes_model():
    return load_model(default_model_folder()).eval()


def _big_scene(size: int = 128) -> Image.Image:
    """Four scenes of the world side by side: a canvas larger than the model's native 64 px."""
    canvas = Image.new("RGB", (size, size))
    for k in range(4):
        scene = world.sample_scene(world.CATEGORIES[k], world.make_rng(3, "eval_scenes", k), 64)
        canvas.paste(world.render(scene), ((k % 2) * 64, (k // 2) * 64))
    return canvas


def test_tiled_decoding_matches_whole_decoding(shapes_model):
    image = image_to_tensor(_big_scene(), 128)  # (1, 3, 128, 128) in [-1, 1]
    with torch.no_grad():
        tokens = shapes_model.encode(image)  # (1, 16, 16, C)
        whole = shapes_model.decode(tokens)
        calls = []
        decode = shapes_model.vae.decode
        shapes_model.vae.decode = lambda z: calls.append(tuple(z.shape[-2:])) or decode(z)
        try:
            tiled = shapes_model.decode(tokens, tile=8)
        finally:
            del shapes_model.vae.decode
    assert tiled.shape == whole.shape == image.shape
    assert len(calls) == 9 and all(h <= 8 and w <= 8 for h, w in calls)  # never more than one tile at a time
    # the VAE (trained on 64 px) reconstructs the 128-px canvas, and as faithfully from tiles as whole
    whole_error, tiled_error = float((whole - image).abs().mean()), float((tiled - image).abs().mean())
    assert whole_error < 0.03 and tiled_error < whole_error * 1.1 + 1e-3, (whole_error, tiled_error)


def test_the_vae_runs_channels_last_and_equals_channels_first_to_rounding(shapes_model):
    """encode / decode convert to channels-last for oneDNN's convolutions and hand back contiguous tensors with
    the values of the channels-first computation (the original's) up to float rounding."""
    vae = shapes_model.vae
    # random pixels: on the world's flat canvases the group norms divide by variances near 0, which magnifies
    # the change of rounding (largest moment difference 1e-3 of values up to 24 on _big_scene(), 4e-5 here)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen = []
    hook = vae.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    try:
        with torch.no_grad():
            moments = vae.encode(image).moments
            pixels = vae.decode(moments[:, : moments.shape[1] // 2])
            first = vae.quant_conv(vae.encoder(image))  # channels-first throughout
            first_pixels = vae.decoder(vae.post_quant_conv(first[:, : first.shape[1] // 2]))
    finally:
        hook.remove()
    assert seen == [True, False]
    assert moments.is_contiguous() and pixels.is_contiguous() and pixels.shape == image.shape
    torch.testing.assert_close(moments, first, rtol=0, atol=1e-5 * float(first.abs().max()))
    torch.testing.assert_close(pixels, first_pixels, rtol=0, atol=1e-4 * float(first_pixels.abs().max()))


def test_a_grid_within_one_tile_is_decoded_exactly(shapes_model):
    tokens = torch.randn(2, 8, 8, shapes_model.token_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(shapes_model.decode(tokens, tile=8), shapes_model.decode(tokens))


def test_impossible_tiles_are_refused(shapes_model):
    tokens = torch.zeros(1, 16, 16, shapes_model.token_dim)
    for tile, overlap in [(1, 0), (8, 8), (8, -1)]:
        with pytest.raises(ValueError, match="tile"):
            shapes_model.vae.decode_tiled(tokens.permute(0, 3, 1, 2), tile, overlap)


def test_pipelines_refuse_impossible_tiles_before_generating(shapes_model):
    from harmon.hub import load_tokenizer
    from harmon.pipelines import EditPipeline, TextToImagePipeline, variation_region

    tokenizer = load_tokenizer(default_model_folder(), 512)
    steps = []
    # the settings refuse the tile as they are made, before any pipeline runs
    with pytest.raises(InputError, match="vae_tile"):
        TextToImagePipeline(shapes_model, tokenizer)("a red circle", GenerationSettings(vae_tile=1),
                                                     callback=steps.append, progress=False)
    assert steps == []  # refused before the first MAR iteration
    region = variation_region(Image.new("RGB", (64, 64), world.BACKGROUND), 0.5, torch.Generator().manual_seed(0),
                              stride=shapes_model.config.mar.vae_stride)
    with pytest.raises(InputError, match="vae_tile"):
        EditPipeline(shapes_model, tokenizer)(region, "a red circle", GenerationSettings(vae_tile=0))


def test_cli_generates_with_tiles_and_refuses_tiny_tiles(tmp_path, capsys):
    out = tmp_path / "big.png"
    assert main(["generate", "a red circle", "--size", "128", "--vae-tile", "8", "--num-iter", "4",
                 "--num-steps", "5", "--seed", "1", "--out", str(out), "-q"]) == 0
    with Image.open(out) as im:
        assert im.size == (128, 128) and im.text["vae_tile"] == "8"
    capsys.readouterr()
    code = main(["generate", "a red circle", "--vae-tile", "1", "--out", str(tmp_path / "x.png")])
    assert_user_error(code, capsys, "vae_tile must be None or at least 2")
