"""The averaged-model bundle in transformers: AutoModelForCausalLM(trust_remote_code) gives pi_mix."""

from __future__ import annotations

import torch

from nemo_logitavg.evaluation import write_bundle
from nemo_logitavg.ops import mixed_logprobs
from tests.tiny_models import make_llama_with_tokenizer


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
