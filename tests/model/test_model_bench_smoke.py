"""The CPU benchmark against torchscale keeps working (tiny sizes; timings are not checked)."""
import torch

from megatron_style.benchmarks import vs_torchscale as bench


def test_bench_pairs_equal_models_and_times_them(torchscale_beit3):
    ref, ours = bench.build_pair(layers=1, dim=32, heads=2, ffn=64, img=32, patch=16, vocab=50,
                                 max_text=8)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        err = (ref(visual_tokens=images)["encoder_out"] - ours.encode_padded(images=images)).abs().max()
    assert err < 1e-5
    times = bench.timed({"ref": lambda: ref(visual_tokens=images)["encoder_out"],
                         "ours": lambda: ours.encode_padded(images=images)}, repeats=1, clock="cpu")
    assert set(times) == {"ref", "ours"} and all(t > 0 for t in times.values())
