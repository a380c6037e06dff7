"""Hugging Face folders whose weights do not match their config.json are refused, naming the
tensors, in every command that loads one (``weights --proxy``, ``embed``; ``eval --model`` and
``train --init-from`` refuse a Hugging Face folder outright): a config of one architecture beside
the weights of another, a missing, unexpected or wrongly shaped tensor. The LM head, which the
base model drops on purpose, is the one expected extra. Real tiny models are built with
transformers (offline) and saved, then doctored."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from chameleon_ext.errors import ChameleonUserError  # noqa: E402
from chameleon_ext.hf_export import export_hf  # noqa: E402
from chameleon_ext.model import load_hf_model  # noqa: E402

from .factories import run_cli, write_text_domains  # noqa: E402
from .test_hf_export import random_gpt  # noqa: E402

EMBED = ["--n-windows", "2", "--window", "16", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``export``: the project's own GPT-2 export (byte tokenizer); ``llama``: a Llama saved by
    transformers with the same vocabulary; the doctored copies of ``export``."""
    root = tmp_path_factory.mktemp("hf")
    export_hf(random_gpt(seed=3), root / "export")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    llama.save_pretrained(root / "llama")
    weights = safetensors_torch.load_file(str(root / "export" / "model.safetensors"))

    def doctored(name, tensors=None, weights_from=None):
        shutil.copytree(root / "export", root / name)
        if weights_from is not None:
            shutil.copy(weights_from, root / name / "model.safetensors")
        else:
            safetensors_torch.save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        return root / name

    out = {"root": root, "export": root / "export", "llama": root / "llama"}
    out["mixed"] = doctored("mixed", weights_from=root / "llama" / "model.safetensors")
    out["no_block0"] = doctored("no_block0", {k: v for k, v in weights.items() if ".h.0." not in k})
    shape = dict(weights)
    key = next(k for k in weights if k.endswith("h.1.mlp.c_fc.weight"))
    shape[key] = torch.zeros(shape[key].shape[0], shape[key].shape[1] // 2)
    out["shape"] = doctored("shape", shape)
    out["extra"] = doctored("extra", {**weights, "transformer.h.0.attn.extra": torch.zeros(3)})
    out["with_head"] = doctored("with_head", {**weights, "lm_head.weight": weights["transformer.wte.weight"].clone()})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_domains(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("case, needles", [
    ("mixed", ["missing from the weights", "h.0.attn.c_attn.weight", "does not have", "model.embed_tokens.weight"]),
    ("no_block0", ["12 tensor(s) of GPT2Model missing", "h.0.attn.c_attn.bias", "h.0.mlp.c_fc.weight"]),
    ("shape", ["another shape", "h.1.mlp.c_fc.weight", "(64, 128) in the file, (64, 256) in GPT2Model"]),
    ("extra", ["does not have", "transformer.h.0.attn.extra"]),
])
def test_a_folder_whose_weights_do_not_match_is_refused(folders, case, needles):
    with pytest.raises(ChameleonUserError) as info:
        load_hf_model(folders[case])
    text = str(info.value)
    assert "\n" not in text and "does not match its config.json" in text
    for needle in needles:
        assert needle in text, text


def test_matching_folders_load_and_the_lm_head_is_the_expected_extra(folders):
    for case in ("export", "llama", "with_head"):  # llama and with_head store an lm_head
        load_hf_model(folders[case])


@pytest.mark.parametrize("command", ["weights", "embed"])
@pytest.mark.parametrize("case", ["mixed", "no_block0"])
def test_every_command_that_loads_a_proxy_refuses_it(folders, data, tmp_path, capsys, command, case):
    extra = ["--no-plots", "--bootstrap", "0"] if command == "weights" else []
    code, out, err = run_cli([command, "--data", data, "--proxy", folders[case], "--out", tmp_path / "o",
                              *EMBED, *extra], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not match its config.json" in lines[0] and "h.0." in lines[0], err
    assert "Traceback" not in err and "LOAD REPORT" not in out + err
    assert not os.path.exists(tmp_path / "o" / "weights.json")


def test_a_good_folder_still_gives_weights(folders, data, tmp_path, capsys):
    code, out, err = run_cli(["weights", "--data", data, "--proxy", folders["export"], "--out", tmp_path / "o",
                              "--no-plots", "--bootstrap", "0", *EMBED], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "weights.json").read_text())["domains"] == ["alpha", "digits", "dna"]


@pytest.mark.parametrize("argv", [["eval", "--model"], ["train", "--steps", "1", "--init-from"]])
def test_eval_and_train_refuse_a_hugging_face_folder(folders, data, tmp_path, capsys, argv):
    code, out, err = run_cli([*argv, folders["no_block0"], "--data", data, "--out", tmp_path / "o.json",
                              "--device", "cpu", "--quiet"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Hugging Face" in err, err


def test_a_bert_checkpoint_with_pretraining_heads_and_no_pooler_loads(tmp_path):
    """BERT's pretraining heads are dropped on purpose and its pooler is never used for hidden
    states: neither is a mismatch. A missing encoder layer still is."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertForPreTraining(cfg).save_pretrained(tmp_path / "pretraining")  # heads + pooler
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")  # head, no pooler
    for name in ("pretraining", "mlm"):
        model = load_hf_model(tmp_path / name)
        assert model.n_layer == 2
    weights = safetensors_torch.load_file(str(tmp_path / "mlm" / "model.safetensors"))
    shutil.copytree(tmp_path / "mlm", tmp_path / "broken")
    safetensors_torch.save_file({k: v for k, v in weights.items() if ".layer.1." not in k},
                                str(tmp_path / "broken" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ChameleonUserError, match=r"encoder\.layer\.1\."):
        load_hf_model(tmp_path / "broken")
