"""scripts/make_ablation_seeds.py: Table 3 variants derived from one trained full_temp (paper C.2 protocol) keep
every shared tensor, drop exactly the ablated module, and load as save_pretrained folders."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import load_script, tiny_model
from test_models_transformer import inputs

from m4v.models import M4VTransformer


def _script():
    return load_script("scripts/make_ablation_seeds.py")


def _velocity(model: M4VTransformer) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs()).sample


def test_variants_written_loadable_and_sharing_weights(tmp_path: Path) -> None:
    source = tiny_model()
    source.save_pretrained(tmp_path / "src")
    assert _script().main(["--transformer", str(tmp_path / "src"), "-o", str(tmp_path / "seeds")]) == 0
    ref = source.state_dict()
    expect = {"full_temp": ("full_temp", True, True), "no_recomposition": ("full_temp", True, False),
              "no_registers": ("full_temp", False, True), "no_temporal": ("full", True, True)}
    for name, flags in expect.items():
        model = M4VTransformer.from_pretrained(tmp_path / "seeds" / f"transformer_{name}", local_files_only=True)
        assert (model.config.layout, model.config.registers, model.config.text_recomposition) == flags
        sd = model.state_dict()
        for key, value in sd.items():
            torch.testing.assert_close(value, ref[key], rtol=0, atol=0)
        dropped = set(ref) - set(sd)
        if name == "no_temporal":
            assert dropped and all(".temporal." in k for k in dropped)
        elif name == "no_registers":
            assert dropped and all(k.endswith(".registers") for k in dropped)
        else:
            assert not dropped


def test_no_temporal_equals_full_temp_whose_branch_outputs_zero() -> None:
    """The temporal branch adds attention over its value projection: with those rows zeroed the branch adds 0, so
    dropping it must leave the velocity unchanged (and with them it must not: the check can fail)."""
    derive = _script().derive
    source = tiny_model()
    ablated = derive(source, {"layout": "full"})
    assert not torch.allclose(_velocity(source), _velocity(ablated), atol=1e-4)
    with torch.no_grad():
        for block in source.single_blocks:
            dim = block.temporal.dim
            block.temporal.qkv.weight[2 * dim:].zero_()
            block.temporal.qkv.bias[2 * dim:].zero_()
    torch.testing.assert_close(_velocity(derive(source, {"layout": "full"})), _velocity(source), rtol=1e-5, atol=1e-6)


def test_refuses_a_source_that_is_not_full_temp(tmp_path: Path, capsys) -> None:
    tiny_model(layout="full_attn").save_pretrained(tmp_path / "attn")
    assert _script().main(["--transformer", str(tmp_path / "attn"), "-o", str(tmp_path / "o")]) == 2
    assert "full_temp" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert _script().main(["--transformer", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
