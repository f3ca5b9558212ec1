"""Checkpoint loading and saving: names, shapes, corruption, FP8, shards, MTP, atomic writes."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import MODEL_ATOL
from model_utils import hf_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import r1kernels
from r1kernels.model.checkpoint import CheckpointError

pytest.importorskip("transformers")


def _tiny(**kw):
    cfg = r1kernels.ModelConfig.preset("tiny")
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return r1kernels.Transformer(cfg)


def _state(model):
    return {k: v.detach().clone() for k, v in list(model.named_parameters()) + list(model.named_buffers())
            if not k.endswith("inv_freq")}


def test_save_load_roundtrip_with_mtp(tmp_path):
    model = _tiny()
    with torch.no_grad():
        for _, b in model.named_buffers():
            if b.dtype == torch.float32 and b.dim() == 1 and b.numel() == 16:
                b.normal_()
    model.save_pretrained(tmp_path / "ck")
    with safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # DeepSeek naming: per-expert tensors, the MTP module as layer num_hidden_layers
    assert "model.layers.1.mlp.experts.15.up_proj.weight" in keys
    assert "model.layers.4.eh_proj.weight" in keys and "model.layers.4.self_attn.kv_b_proj.weight" in keys
    loaded = r1kernels.load_pretrained(tmp_path / "ck", dtype=torch.float32)
    a, b = _state(model), _state(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ids = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)
        h = model.forward_hidden(ids)
        mtp = model.mtp_forward(h, ids)
        assert len(mtp) == 1 and mtp[0].shape == (2, 8, 1024)


def test_sharded_roundtrip(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "ck", max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = r1kernels.load_pretrained(tmp_path / "ck", dtype=torch.float32)
    ids = torch.randint(0, 1024, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), atol=0, rtol=0)


def test_bf16_load_keeps_router_fp32(tmp_path):
    _tiny().save_pretrained(tmp_path / "ck")
    m = r1kernels.load_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert m.layers[1].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert m.layers[1].mlp.gate.weight.dtype == torch.float32
    assert m.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(m(torch.randint(0, 1024, (1, 5)))).all()


def test_missing_mtp_layers_warn(tmp_path):
    hf = hf_model("v3")
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("num_nextn_predict_layers", 1) >= 1
    with pytest.warns(UserWarning, match="MTP"):
        m = r1kernels.load_pretrained(tmp_path, dtype=torch.float32)
    assert len(m.mtp) == 0 and m.config.num_nextn_predict_layers == 0


def _rewrite(src_dir, dst_dir, edit):
    os.makedirs(dst_dir, exist_ok=True)
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst_dir, "model.safetensors"))
    with open(os.path.join(src_dir, "config.json")) as f, open(os.path.join(dst_dir, "config.json"), "w") as g:
        g.write(f.read())


def test_mismatched_checkpoint_lists_every_tensor(tmp_path):
    _tiny().save_pretrained(tmp_path / "ok")

    def edit(t):
        del t["model.layers.2.mlp.experts.3.gate_proj.weight"]
        del t["model.norm.weight"]
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)

    _rewrite(tmp_path / "ok", tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as exc:
        r1kernels.load_pretrained(tmp_path / "bad")
    msg = str(exc.value)
    for name in ("model.layers.2.mlp.experts.3.gate_proj.weight", "model.norm.weight",
                 "model.layers.0.self_attn.extra.weight", "model.layers.0.self_attn.o_proj.weight"):
        assert name in msg
    assert "2 missing" in msg and "1 unexpected" in msg and "1 misshaped" in msg and "[3, 3]" in msg


def test_corrupted_checkpoint_names_the_file(tmp_path):
    _tiny().save_pretrained(tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated mid-data
    with pytest.raises(CheckpointError, match="model.safetensors"):
        r1kernels.load_pretrained(tmp_path / "ck")
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="corrupted"):
        r1kernels.load_pretrained(tmp_path / "ck")


def test_pickle_only_directory_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(r1kernels.ModelConfig.preset("tiny").to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="pickle"):
        r1kernels.load_pretrained(tmp_path)


def test_fp8_block_quantised_weights_load_dequantised(tmp_path):
    """FP8 e4m3 weights with a per-128x128-block weight_scale_inv load to weight * scale."""
    hf = hf_model("v3", hidden_size=160, intermediate_size=272, q_lora_rank=136)
    hf.save_pretrained(tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    expected = {}
    g = torch.Generator().manual_seed(0)
    for key in ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
                "model.layers.1.self_attn.q_a_proj.weight", "model.layers.2.mlp.experts.5.up_proj.weight"]:
        w = tensors[key]
        n, k = w.shape
        scale = torch.rand((n + 127) // 128, (k + 127) // 128, generator=g) * 0.01 + 0.001
        q = (w / scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]).clamp(-448, 448)
        q = q.to(torch.float8_e4m3fn)
        tensors[key] = q
        tensors[key + "_scale_inv"] = scale
        expected[key] = q.float() * scale.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    os.makedirs(tmp_path / "fp8")
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(cfg))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = r1kernels.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    got = {
        "model.layers.0.mlp.gate_proj.weight": m.layers[0].mlp.gate_proj.weight,
        "model.layers.0.mlp.down_proj.weight": m.layers[0].mlp.down_proj.weight,
        "model.layers.1.self_attn.q_a_proj.weight": m.layers[1].self_attn.q_a_proj.weight,
        "model.layers.2.mlp.experts.5.up_proj.weight": m.layers[2].mlp.experts.w13[5, 32:],
    }
    for key, want in expected.items():
        assert torch.equal(got[key].detach(), want), key
        # and the dequantised weight is close to the original (the quantisation is real, not a no-op)
        assert not torch.equal(got[key].detach(), load_file(str(tmp_path / "hf" / "model.safetensors"))[key])


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    old = _tiny()
    old.save_pretrained(tmp_path / "ck")
    new = _tiny()
    with torch.no_grad():
        new.norm.weight.fill_(3.0)

    def crash(_tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path / "ck", _before_commit=crash)
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind
    loaded = r1kernels.load_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert torch.equal(loaded.norm.weight, old.norm.weight)
    new.save_pretrained(tmp_path / "ck")  # a completed save replaces it
    assert torch.equal(r1kernels.load_pretrained(tmp_path / "ck", dtype=torch.float32).norm.weight, new.norm.weight)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_killed_process_mid_save_leaves_previous_checkpoint(tmp_path):
    """A process killed while writing (no cleanup runs) leaves the committed checkpoint loadable."""
    _tiny().save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    script = textwrap.dedent(f"""
        import os, torch, r1kernels
        import r1kernels.model.checkpoint as ck
        real = ck._write_safetensors
        def die(file, tensors):
            real(file, tensors[: len(tensors) // 2])
            os._exit(9)  # killed mid-write: no exception handlers, no cleanup
        ck._write_safetensors = die
        m = r1kernels.Transformer(r1kernels.ModelConfig.preset("tiny"))
        m.save_pretrained({str(tmp_path / 'ck')!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    r1kernels.load_pretrained(tmp_path / "ck")
