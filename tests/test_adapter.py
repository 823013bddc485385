"""Adapter: shapes, padding invariance, causality, gradients, config checks, paper-size parameter count."""

import pytest
import torch

from config import ConfigError, from_dict
from model.adapter import Adapter, AdapterConfig

IN_DIM, OUT_DIM = 6, 10


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(stack: int = 3, **kw) -> Adapter:
    torch.manual_seed(0)
    cfg = AdapterConfig(stack=stack, layers=2, width=16, mlp=32, heads=4, kv_heads=2, **kw)
    return Adapter(cfg, IN_DIM, OUT_DIM).eval()


@pytest.mark.parametrize("num_frames", [1, 5, 7, 10])
def test_shapes_and_lengths(num_frames):
    adapter = tiny(stack=3)
    lengths = torch.tensor([num_frames, 1, max(1, num_frames - 2), 0])
    out, out_lengths = adapter(torch.randn(4, num_frames, IN_DIM), lengths)
    steps = -(-num_frames // 3)
    assert out.shape == (4, steps, OUT_DIM)
    assert out_lengths.tolist() == [-(-n // 3) for n in lengths.tolist()]
    assert adapter.output_length(num_frames) == steps
    for row, n in zip(out, out_lengths.tolist(), strict=True):
        assert torch.all(row[n:] == 0) and (n == 0 or row[:n].abs().sum() > 0)


def test_padding_invariance():
    adapter = tiny(stack=3)
    frames = torch.randn(1, 8, IN_DIM)  # 8 frames: the last stack is partial (2 of 3)
    alone, _ = adapter(frames, torch.tensor([8]))
    # Padded longer with garbage (not zeros), next to a longer item: the valid outputs must not move.
    padded = torch.randn(2, 14, IN_DIM) * 5
    padded[0, :8] = frames[0]
    both, out_lengths = adapter(padded, torch.tensor([8, 14]))
    assert out_lengths.tolist() == [3, 5]
    torch.testing.assert_close(both[0, :3], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.all(both[0, 3:] == 0)
    other, _ = adapter(padded[1:], torch.tensor([14]))
    torch.testing.assert_close(both[1], other[0], atol=1e-5, rtol=1e-5)


def test_causal():
    adapter = tiny(stack=2)
    frames = torch.randn(1, 12, IN_DIM)
    lengths = torch.tensor([12])
    before, _ = adapter(frames, lengths)
    t = 7
    frames[0, t] += 1.0
    after, _ = adapter(frames, lengths)
    torch.testing.assert_close(after[0, : t // 2], before[0, : t // 2], atol=0, rtol=0)
    assert not torch.allclose(after[0, t // 2:], before[0, t // 2:])


def test_gradients_reach_all_parameters():
    adapter = tiny(stack=2).train()
    out, _ = adapter(torch.randn(2, 9, IN_DIM), torch.tensor([9, 4]))
    out.pow(2).sum().backward()
    params = dict(adapter.named_parameters())
    assert not any("embed_tokens" in name for name in params)
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_checkpointing_same_result():
    frames, lengths = torch.randn(2, 9, IN_DIM), torch.tensor([9, 5])
    results = []
    for enabled in (False, True):
        adapter = tiny(stack=2).train()
        adapter.set_gradient_checkpointing(enabled)
        assert all(layer.gradient_checkpointing == enabled for layer in adapter.backbone.layers)
        out, _ = adapter(frames, lengths)
        out.sum().backward()
        results.append((out.detach(), [p.grad for p in adapter.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, ckpt in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(plain, ckpt)


def test_bad_input_shape():
    adapter = tiny()
    with pytest.raises(ValueError, match="frames must be"):
        adapter(torch.randn(2, 5, IN_DIM + 1), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="lengths must be"):
        adapter(torch.randn(2, 5, IN_DIM), torch.tensor([5]))


@pytest.mark.parametrize("values, key", [
    ({"width": 30, "heads": 4}, "adapter.width"),  # not divisible
    ({"width": 20, "heads": 4, "kv_heads": 4}, "adapter.width"),  # head size 5: odd, no rotary
    ({"heads": 4, "kv_heads": 3}, "adapter.kv_heads"),
    ({"stack": 0}, "adapter.stack"),
    ({"layers": -1}, "adapter.layers"),
    ({"mlp": 0}, "adapter.mlp"),
    ({"dropout": 1.0}, "adapter.dropout"),
    ({"width": "wide"}, "adapter.width"),
])
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        from_dict(AdapterConfig, values, "adapter")


def expected_parameters(cfg: AdapterConfig, in_dim: int, out_dim: int) -> int:
    """Qwen2 layer: q/k/v with bias, o without, gated MLP (3 matrices), 2 RMSNorms; no token embeddings."""
    head = cfg.width // cfg.heads
    attn = (cfg.width + 1) * head * (cfg.heads + 2 * cfg.kv_heads) + cfg.heads * head * cfg.width
    layer = attn + 3 * cfg.width * cfg.mlp + 2 * cfg.width
    return ((in_dim * cfg.stack + 1) * cfg.width + cfg.layers * layer + cfg.width
            + (cfg.width + 1) * out_dim)


def test_paper_parameter_count():
    cfg = AdapterConfig(stack=4, layers=12, width=960, mlp=2560, heads=15, kv_heads=5)
    with torch.device("meta"):
        adapter = Adapter(cfg, in_dim=512, out_dim=2048)  # Mimi latents -> Qwen2.5-3B hidden size
    count = sum(p.numel() for p in adapter.parameters())
    assert count == expected_parameters(cfg, 512, 2048)
    assert 115e6 < count < 130e6  # the paper reports about 122M
