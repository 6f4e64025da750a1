"""validate_model finds what would break inference memory in a loaded model; validate_checkpoint reads headers only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kvlab.checkpoint import build_checkpoint, random_state_dict
from kvlab.config import preset
from kvlab.errors import CheckpointError
from kvlab.loaders import build_model, load_model
from kvlab.model import MistralForCausalLM
from kvlab.memory.validate import ModelValidationError, validate_checkpoint, validate_model


def tiny(trainable: bool = False, **overrides: object) -> nn.Module:
    config = preset("tiny", **overrides)
    return build_model(config, random_state_dict(config, seed=0), trainable=trainable)


def rows(report, check: str) -> list[str]:
    return report.findings.loc[report.findings["check"] == check, "parameter"].tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("tiny", root=tmp_path_factory.mktemp("ckpt"))


def test_inference_model_is_clean() -> None:
    report = validate_model(tiny())
    assert report.findings.empty and report.clean and report.passed
    assert report.verdict.startswith("OK")
    assert list(report.findings.columns) == ["parameter", "check", "severity", "detail"]


@pytest.mark.parametrize("loader, clean", [("trainable", False), ("threaded", False), ("inference", True), ("int8", True)])
def test_every_loader(checkpoint: Path, loader: str, clean: bool) -> None:
    model = load_model(checkpoint, loader)
    report = validate_model(model, expected_dtype=torch.float32, expected_device="cpu")
    assert report.clean is clean
    flagged = set(rows(report, "requires_grad"))
    assert flagged == {name for name, p in model.named_parameters() if p.requires_grad}
    if not clean:
        assert report.verdict.startswith("FAIL") and f"{len(flagged)} requires_grad" in report.verdict
        assert set(report.findings["severity"]) == {"error"}


def test_silently_copied_tie_is_flagged() -> None:
    model = tiny()  # the config says untied; the output embedding is a copy of the input one
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    report = validate_model(model)
    assert rows(report, "copied_tie") == ["lm_head.weight"]
    assert report.passed and not report.clean and report.verdict.startswith("WARN")


def test_declared_tie_is_clean_and_a_broken_one_is_an_error() -> None:
    model = tiny(tie_word_embeddings=True)
    assert validate_model(model).clean
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    report = validate_model(model)
    assert rows(report, "tie_broken") == ["lm_head.weight"] and not report.passed
    assert rows(report, "copied_tie") == []  # one finding for one problem


def test_equal_constant_weights_are_not_copies() -> None:
    # RMSNorm weights start as all ones: equal values prove nothing about copying.
    report = validate_model(tiny())
    assert rows(report, "copied_tie") == []


def test_meta_weights_are_flagged() -> None:
    with torch.device("meta"):  # built but never loaded, as a loader that forgot a tensor would leave it
        model = MistralForCausalLM(preset("tiny")).requires_grad_(False)
    report = validate_model(model)
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert set(rows(report, "meta")) == expected
    assert not report.passed


def test_non_contiguous_and_mixed_dtype_and_shared_storage() -> None:
    model = tiny()
    mlp0, mlp1, mlp2 = (model.model.layers[i].mlp for i in range(3))
    mlp0.up_proj.weight = nn.Parameter(mlp0.up_proj.weight.detach().t().contiguous().t(), requires_grad=False)
    mlp1.up_proj.weight = nn.Parameter(mlp1.up_proj.weight.detach().half(), requires_grad=False)
    both = torch.randn(2, *mlp2.up_proj.weight.shape)
    mlp2.gate_proj.weight = nn.Parameter(both[0], requires_grad=False)
    mlp2.up_proj.weight = nn.Parameter(both[1], requires_grad=False)
    report = validate_model(model)
    assert rows(report, "non_contiguous") == ["model.layers.0.mlp.up_proj.weight"]
    assert rows(report, "mixed_dtype") == ["model.layers.1.mlp.up_proj.weight"]
    assert rows(report, "shared_storage") == ["model.layers.2.mlp.up_proj.weight"]
    typed = validate_model(model, expected_dtype="float32")
    assert rows(typed, "dtype") == ["model.layers.1.mlp.up_proj.weight"] and not typed.passed


def test_unexpected_device() -> None:
    model = tiny()
    report = validate_model(model, expected_device="cuda")
    assert len(rows(report, "device")) == report.checked  # every tensor is on the CPU


def test_strict_raises_with_the_findings() -> None:
    with pytest.raises(ModelValidationError) as info:
        validate_model(tiny(trainable=True), strict=True)
    assert "requires_grad" in str(info.value) and "model.embed_tokens.weight" in str(info.value)
    assert not info.value.report.passed
    copied = tiny()
    copied.lm_head.weight = nn.Parameter(copied.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    with pytest.raises(ModelValidationError):  # strict: warnings fail too
        validate_model(copied, strict=True)
    validate_model(tiny(), strict=True)  # clean: no exception


def test_rejects_non_modules() -> None:
    with pytest.raises(TypeError):
        validate_model({"weight": torch.zeros(2)})  # type: ignore[arg-type]


def test_transformers_model() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.MistralForCausalLM(config)
    report = validate_model(model)  # from_config / from_pretrained weights require grad by default
    assert set(rows(report, "requires_grad")) == {n for n, _ in model.named_parameters()}
    model.requires_grad_(False)
    assert validate_model(model).clean  # its tie is declared by its config
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone(), requires_grad=False)
    assert rows(validate_model(model), "tie_broken") == ["lm_head.weight"]


def test_validate_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    report = validate_checkpoint(checkpoint)
    assert report.clean and report.details["tensors"] == 39 and report.details["dtype"] == "float32"
    assert rows(validate_checkpoint(checkpoint, expected_dtype="bfloat16"), "dtype") == ["config.json"]
    # A tied config whose file also stores lm_head: usable, but worth a warning.
    config = preset("tiny", tie_word_embeddings=True)
    state = random_state_dict(config, seed=0)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    tied = tmp_path / "tied"  # written by hand: kvlab's own writer never stores the copy
    tied.mkdir()
    save_file(state, tied / "model.safetensors", metadata={"format": "pt"})
    config.save(tied / "config.json")
    assert rows(validate_checkpoint(tied), "tied_copy_stored") == ["lm_head.weight"]


def test_validate_checkpoint_reads_headers_only(checkpoint: Path, tmp_path: Path, copy_checkpoint) -> None:
    broken = copy_checkpoint(checkpoint, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        validate_checkpoint(broken)
