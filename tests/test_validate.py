"""validate_model finds what would break inference memory in a loaded model, kvlab's or not;
validate_checkpoint (kvlab's core) runs loading's checks without loading."""

from __future__ import annotations

from pathlib import Path

import foreign_models as fm
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kvlab.checkpoint import validate_checkpoint
from kvlab.config import preset
from kvlab.errors import CheckpointError
from kvlab.loaders import build_model, load_model
from kvlab.memory.validate import ModelValidationError, validate_model
from kvlab.model import MistralForCausalLM
from kvlab.synthetic import build_checkpoint, random_state_dict


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


@pytest.mark.parametrize("loader, clean",
                         [("trainable", False), ("threaded", False), ("inference", True), ("int8", True)])
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
    both = torch.randn(mlp2.up_proj.weight.numel() + 16)
    mlp2.gate_proj.weight = nn.Parameter(both[:-16].view_as(mlp2.up_proj.weight), requires_grad=False)
    mlp2.up_proj.weight = nn.Parameter(both[16:].view_as(mlp2.up_proj.weight), requires_grad=False)  # overlaps
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


@pytest.mark.parametrize("arch", ["mistral", "llama", "gpt2", "qwen2"])
def test_transformers_models(arch: str, tmp_path: Path) -> None:
    model = fm.hf_model(arch, tie_word_embeddings=True, save_to=tmp_path / arch)
    report = validate_model(model)  # from_pretrained weights require grad by default
    assert set(rows(report, "requires_grad")) == {n for n, _ in model.named_parameters()}
    model.requires_grad_(False)
    assert validate_model(model).clean  # its tie is declared by its config
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    assert rows(validate_model(model), "tie_broken") == [names[id(head.weight)]]


def _flat_weights(model: nn.Module, names: list[str], offsets: list[int]) -> None:
    """Point the named weights at slices of one flat buffer starting at ``offsets`` (in elements),
    as a loader that reads one blob and slices it would."""
    params = dict(model.named_parameters())
    flat = torch.randn(max(o + params[n].numel() for n, o in zip(names, offsets)))
    for name, offset in zip(names, offsets):
        module_name, _, attr = name.rpartition(".")
        shape = params[name].shape
        piece = flat[offset:offset + shape.numel()].view(shape)
        setattr(model.get_submodule(module_name), attr, nn.Parameter(piece, requires_grad=False))


def test_disjoint_slices_of_one_buffer_do_not_share_memory() -> None:
    model = fm.TinyLM().requires_grad_(False)
    names = ["blocks.0.q.weight", "blocks.0.k.weight", "blocks.0.v.weight"]
    sizes = [model.get_parameter(n).numel() for n in names]
    _flat_weights(model, names, [0, sizes[0], sizes[0] + sizes[1]])  # back to back: one storage, no overlap
    assert len({model.get_parameter(n).untyped_storage().data_ptr() for n in names}) == 1
    assert validate_model(model).clean
    _flat_weights(model, names, [0, sizes[0] - 8, sizes[0] + sizes[1]])  # k starts inside q: 8 elements shared
    assert rows(validate_model(model), "shared_storage") == ["blocks.0.k.weight"]


def test_interleaved_views_are_compared_element_by_element() -> None:
    model = fm.TinyLM().requires_grad_(False)
    rows_, cols = model.blocks[0]["q"].weight.shape
    fused = torch.randn(rows_, 2 * cols + 2)
    model.blocks[0]["q"].weight = nn.Parameter(fused[:, 0:2 * cols:2], requires_grad=False)  # even columns
    model.blocks[0]["o"].weight = nn.Parameter(fused[:, 1:2 * cols + 1:2], requires_grad=False)  # odd: disjoint
    assert rows(validate_model(model), "shared_storage") == []
    model.blocks[0]["o"].weight = nn.Parameter(fused[:, 2:2 * cols + 2:2], requires_grad=False)  # even again: overlap
    assert rows(validate_model(model), "shared_storage") == ["blocks.0.o.weight"]


def test_a_tie_between_disjoint_slices_is_broken() -> None:
    model = tiny(tie_word_embeddings=True)
    embed, head = model.model.embed_tokens, model.lm_head
    both = torch.randn(2, *embed.weight.shape)
    both[1] = both[0]  # equal values, separate memory in one storage
    embed.weight = nn.Parameter(both[0], requires_grad=False)
    head.weight = nn.Parameter(both[1], requires_grad=False)
    assert rows(validate_model(model), "tie_broken") == ["lm_head.weight"]


def checks(report, check: str) -> list[str]:
    return [f.parameter for f in report.findings if f.check == check]


def test_validate_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    report = validate_checkpoint(checkpoint)
    assert report.clean and report.details["tensors"] == 39 and report.details["dtype"] == "float32"
    assert checks(validate_checkpoint(checkpoint, expected_dtype="bfloat16"), "dtype") == ["config.json"]
    # A tied config whose file also stores lm_head: usable, but worth a warning.
    config = preset("tiny", tie_word_embeddings=True)
    state = random_state_dict(config, seed=0)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    tied = tmp_path / "tied"  # written by hand: kvlab's own writer never stores the copy
    tied.mkdir()
    save_file(state, tied / "model.safetensors", metadata={"format": "pt"})
    config.save(tied / "config.json")
    assert checks(validate_checkpoint(tied), "tied_copy_stored") == ["lm_head.weight"]


def test_validate_checkpoint_reads_headers_only(checkpoint: Path, tmp_path: Path, copy_checkpoint) -> None:
    broken = copy_checkpoint(checkpoint, tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors"):
        validate_checkpoint(broken)
