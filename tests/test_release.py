"""The averaged-model bundle: its layout on disk (written and read back, and what is refused) and in transformers,
where AutoModelForCausalLM(trust_remote_code) gives pi_mix."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from nemo_logitavg.models.bundle import read_bundle, write_bundle
from nemo_logitavg.ops import mixed_logprobs
from tests.tiny_models import make_fake_hf_dir, make_llama_with_tokenizer


def test_bundle_round_trip(tmp_path):
    policy, reference = make_fake_hf_dir(tmp_path / "pol", "p"), make_fake_hf_dir(tmp_path / "ref", "r")
    out = write_bundle(policy, reference, 0.25, tmp_path / "bundle")
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["architectures"] == ["LogitAveragedForCausalLM"] and config["ref_weight"] == 0.25
    bundle = read_bundle(out)
    assert bundle.ref_weight == 0.25
    assert Path(bundle.policy, "model.safetensors").read_bytes() == b"weights p"
    assert Path(bundle.reference, "model.safetensors").read_bytes() == b"weights r"

    linked = read_bundle(write_bundle(policy, reference, 1.0, tmp_path / "b2", False))
    assert linked.reference == os.path.abspath(reference) and not (tmp_path / "b2" / "reference").exists()


def test_bundle_errors(tmp_path):
    policy = make_fake_hf_dir(tmp_path / "pol", "p")
    with pytest.raises(ValueError, match="ref_weight must lie"):
        write_bundle(policy, policy, 1.5, tmp_path / "b")
    with pytest.raises(ValueError, match="not a bundle"):
        read_bundle(policy)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["LogitAveragedForCausalLM"], "ref_weight": 0.5}))
    with pytest.raises(ValueError, match="policy"):
        read_bundle(bad)


def test_bundle_loads_in_transformers_and_gives_pi_mix(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = make_llama_with_tokenizer(str(tmp_path / "policy"), seed=1)
    reference = make_llama_with_tokenizer(str(tmp_path / "reference"), seed=2)
    with torch.no_grad():  # spread the logits so that averaging matters
        for path in (policy, reference):
            model = AutoModelForCausalLM.from_pretrained(path)
            for param in model.parameters():
                param.normal_(0.0, 0.3) if param.dim() > 1 else param.uniform_(0.8, 1.2)
            model.save_pretrained(path)
    bundle = write_bundle(policy, reference, 0.3, tmp_path / "bundle")

    mixed = AutoModelForCausalLM.from_pretrained(bundle, trust_remote_code=True)
    assert type(mixed).__name__ == "LogitAveragedForCausalLM"
    pol = AutoModelForCausalLM.from_pretrained(policy).eval()
    ref = AutoModelForCausalLM.from_pretrained(reference).eval()
    ids = AutoTokenizer.from_pretrained(policy)("12+30=", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = mixed(ids).logits
        z_pol, z_ref = pol(ids).logits, ref(ids).logits
    torch.testing.assert_close(logits, 0.7 * z_pol + 0.3 * z_ref, rtol=0, atol=1e-6)
    # Its log-softmax is the trainer's log pi_mix on the same weights.
    targets = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    expected = mixed_logprobs(z_pol, z_ref, targets, 0.3)
    got = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert (got - expected).abs().max() < 1e-5
    assert (torch.log_softmax(z_pol, -1) - torch.log_softmax(logits, -1)).abs().max() > 1e-2, "a must matter"

    # generate() decodes greedily from pi_mix: each new token is the argmax of the averaged logits.
    out = mixed.generate(ids, max_new_tokens=5, do_sample=False)
    seq = ids
    for _ in range(5):
        with torch.no_grad():
            nxt = (0.7 * pol(seq).logits[:, -1] + 0.3 * ref(seq).logits[:, -1]).argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out[:, : seq.shape[1]], seq)
