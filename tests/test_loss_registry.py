"""The loss registry: a new loss is one registered function; the config, the required arrays and the step's
denominators follow from its spec, with no edit elsewhere."""

import pytest
import torch

from megatron_offgrpo.config.loader import ConfigError, load_config, validate_config
from megatron_offgrpo.config.schema import LossConfig
from megatron_offgrpo.losses import policy_loss
from megatron_offgrpo.losses.registry import _REGISTRY, TokenLoss, get_loss, loss_names, register_loss, required_arrays


@pytest.fixture
def vanilla_pg():
    """A plain policy gradient -A * logp (no clip, no ratio), registered for the duration of a test."""

    @register_loss("test_vanilla_pg", advantage="group", kl=True)
    def vanilla(logp, adv, old, *, clip_eps, shaping_gamma):
        return TokenLoss(-adv * logp, torch.zeros_like(logp, dtype=torch.bool), torch.exp(logp))

    yield "test_vanilla_pg"
    del _REGISTRY["test_vanilla_pg"]


def test_builtin_losses_and_their_specs():
    assert loss_names()[:4] == ("offline_grpo", "grpo", "sft", "opd")
    assert required_arrays(LossConfig(kind="offline_grpo", kl_coef=0.1)) == ["ref_logp"]
    assert required_arrays(LossConfig(kind="offline_grpo", kl_coef=0.0)) == []
    assert required_arrays(LossConfig(kind="grpo", kl_coef=0.1)) == ["old_logp", "ref_logp"]
    assert required_arrays(LossConfig(kind="opd", kl_coef=0.1)) == ["teacher_logp"]  # OPD has no KL term
    assert required_arrays(LossConfig(kind="sft", kl_coef=0.1, reference="none")) == []
    assert get_loss("sft").trains_on == "positive" and get_loss("opd").old_logprobs == "policy"
    with pytest.raises(ValueError, match="unknown loss kind 'ppo'.*offline_grpo"):
        get_loss("ppo")


def test_a_registered_loss_is_usable_everywhere(vanilla_pg):
    # The loss core: value and gradient against a hand computation, with the KL term the spec allows.
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.8, 0.1]])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, metrics = policy_loss(logp, mask, adv, kind=vanilla_pg, kl_coef=0.0)
    loss.backward()
    lp = logp.detach()
    expected = (-(2.0 * lp[0, 0] + 2.0 * lp[0, 1]) / 2 + (lp[1, 0]) / 1) / 2  # seq-mean-token-mean
    assert abs(loss.item() - expected.item()) < 1e-6
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -0.5], [0.5, 0.0]]))
    assert metrics["num_sequences"].item() == 2
    # The config: the new name is a valid choice, and its arrays are what the registry says.
    cfg = load_config(None, [f"loss.kind={vanilla_pg}", "loss.kl_coef=0.1", "data.train_prefix=unused"])
    validate_config(cfg, world_size=1, check_files=False)
    assert required_arrays(cfg.loss) == ["ref_logp"]


def test_registry_rejects_duplicates_and_bad_specs(vanilla_pg):
    with pytest.raises(ValueError, match="already registered"):
        register_loss(vanilla_pg, advantage="group")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="advantage in"):
        register_loss("test_bad", advantage="sequence")
    cfg = load_config(None, ["loss.kind=test_unknown", "data.train_prefix=unused"])
    with pytest.raises(ConfigError, match="loss.kind='test_unknown' is not one of .*test_vanilla_pg"):
        validate_config(cfg, world_size=1, check_files=False)


def test_sft_takes_rewards_not_advantages():
    logp, mask = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="takes no advantages"):
        policy_loss(logp, mask, torch.ones(2), kind="sft", rewards=torch.ones(2))
    with pytest.raises(ValueError, match="pass rewards="):
        policy_loss(logp, mask, kind="sft")
