"""model.pt round trip and the fx split of the backbone."""
import torch

from edgeexit.train.models import load_model, read_checkpoint


def test_model_pt_is_a_plain_dict_that_round_trips(tiny_model_path, tmp_path):
    data = torch.load(tiny_model_path, weights_only=True)
    assert data["format"] == "edgeexit-model" and isinstance(data["config"], dict)
    assert all(isinstance(v, torch.Tensor) for v in data["state_dict"].values())
    model = load_model(tiny_model_path)
    reloaded = read_checkpoint(tiny_model_path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded["state_dict"][key])
    x = torch.randn(4, *model.config.input_shape)
    with torch.no_grad():
        exits_a, final_a = model(x)
        exits_b, final_b = load_model(tiny_model_path)(x)
    assert torch.equal(final_a, final_b)
    for a, b in zip(exits_a, exits_b):
        assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_segments_chain_to_the_plain_backbone(tiny_model_path):
    model = load_model(tiny_model_path)
    x = torch.randn(3, *model.config.input_shape)
    with torch.no_grad():
        h = x
        for segment in model.segments:
            h = segment(h)
        assert torch.allclose(h, model.backbone(x), atol=1e-5)


def test_exit_costs_increase_and_end_above_one(tiny_model_path):
    costs = load_model(tiny_model_path).exit_costs()
    assert costs == sorted(costs) and 0 < costs[0] < 1
    assert costs[-1] >= 1.0  # the final stage also paid for every head it passed
